"""`glm4serve serve ...` (the OpenAI-compatible server) and `glm4serve make-model ...`."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import faulthandler
import logging
import os
import signal
import socket
import sys
import typing
from typing import Literal

from glm4serve import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4serve", description="OpenAI-compatible server for GLM-4 models")
    parser.add_argument("--version", action="version", version=f"glm4serve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="the checkpoint, as --model (as in `vllm serve MODEL`)")
    add_settings_flags(serve)
    add_vllm_flags(serve)
    # Listed for --help only: main() hands its arguments to make_model_main untouched.
    commands.add_parser("make-model", help="write a small random GLM-4 checkpoint (see make-model --help)",
                        add_help=False)
    return parser


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """A --kebab-case flag per ServerSettings field, its help the field's description. Values stay
    strings for pydantic to parse; a flag left out is absent, so that env variables and the YAML
    file still apply to it."""
    from pydantic_core import PydanticUndefined

    from glm4serve.api.settings import ServerSettings

    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "").replace("%", "%%")  # argparse formats help with %
        if field.default not in (None, PydanticUndefined) and "default" not in help_:
            # argparse cannot show it: the flag's own default is SUPPRESS, for the env and the YAML to apply
            shown = f"{field.default >> 20}MiB" if name.endswith(("_bytes", "_memory")) else field.default
            help_ += f" (default: {shown})"
        if field.annotation is bool:  # --flag / --no-flag
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        else:
            choices = _literal_choices(field.annotation)
            # --lora-modules a=/x b=/y, --served-model-name a b
            several = typing.get_origin(field.annotation) is dict or (field.json_schema_extra or {}).get("several")
            many = "+" if several else None
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices, nargs=many, help=help_)


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    from glm4serve.api.settings import VLLM_SETTINGS_WITHOUT_EFFECT

    for name, (takes_value, why) in VLLM_SETTINGS_WITHOUT_EFFECT.items():
        parser.add_argument("--" + name.replace("_", "-"), dest="vllm_" + name, default=argparse.SUPPRESS,
                            **({"metavar": "VALUE"} if takes_value else {"action": "store_true"}),
                            help=f"vLLM's, taken for its command lines: no effect ({why})")


def vllm_flags_given(args: argparse.Namespace) -> list[str]:
    from glm4serve.api.settings import VLLM_SETTINGS_WITHOUT_EFFECT

    return ["--" + name.replace("_", "-") for name in VLLM_SETTINGS_WITHOUT_EFFECT if hasattr(args, "vllm_" + name)]


def _literal_choices(annotation) -> tuple | None:
    """The values of a Literal field, or of `Literal[...] | None`; None for any other type."""
    for t in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(t) is Literal:
            return typing.get_args(t)
    return None


def settings_from_args(args: argparse.Namespace):
    from glm4serve.api.settings import ServerSettings

    given = {name: getattr(args, name) for name in ServerSettings.model_fields if hasattr(args, name)}
    if getattr(args, "model_tag", None) is not None:
        if given.get("model", args.model_tag) != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag} and --model {given['model']}")
        given["model"] = args.model_tag
    return ServerSettings(**given)


@contextlib.contextmanager
def cannot_serve(log_level: str):
    """The settings, the checkpoint or the hub refuse: say what in one line, not where."""
    try:
        yield
    except (ValueError, OSError) as e:
        if log_level == "debug":
            raise
        raise SystemExit(f"glm4serve: cannot serve: {e} (--log-level debug shows where)") from None


def serve(settings) -> int:
    """Serve until SIGTERM and the drain -> the exit status (1: the engine died)."""
    log_level = settings.log_level
    if settings.num_replicas > 1 or settings.ray_address:
        from glm4serve.cluster import check_before_deploying, serve_replicated  # imports Ray: only here

        with cannot_serve(log_level):
            check_before_deploying(settings)
        serve_replicated(settings)
        return 0
    # `kill -USR1 PID` writes every thread's stack to stderr, where the log goes: what a server that
    # does not come up, or stops answering, is doing, without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from glm4serve.api.app import create_app
    from glm4serve.api.shutdown import run_server
    from glm4serve.server import build_engine  # lazy: loads torch and the model

    with cannot_serve(log_level):
        check_address(settings.host, settings.port)  # before minutes of loading, not after
        engine, tokenizer, model_name, max_model_len = build_engine(settings)
    app = create_app(engine, tokenizer, settings, model_name, max_model_len)
    try:
        return run_server(app, settings, log_level)  # returns after SIGTERM and the drain
    finally:
        engine.shutdown()


def check_address(host: str, port: int) -> None:
    """ValueError naming --host or --port when the server could not listen there (an unknown host, a
    port in use): bound as uvicorn binds it, and let go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"--host {host} --port {port}: cannot listen there: {e.strerror}") from None


# GLM4SERVE_ variables that are not settings: read where they act, like ONEDNN_MAX_CPU_ISA by oneDNN
NOT_SETTINGS = ("GLM4SERVE_MAX_CPU_ISA",)  # model/int8_kernel.py's cpu_has


def warn_unknown_variables(environ: typing.Mapping[str, str]) -> None:
    """A GLM4SERVE_ variable that names no setting (a typo) changes nothing: say so, and what was meant."""
    from glm4serve.api.settings import ServerSettings

    prefix = ServerSettings.model_config["env_prefix"]  # GLM4SERVE_
    names = [name.upper() for name in ServerSettings.model_fields]
    for key in sorted(k for k in environ if k.upper().startswith(prefix)):
        name = key.upper().removeprefix(prefix)
        if name not in names and key.upper() not in NOT_SETTINGS:
            close = difflib.get_close_matches(name, names, n=1)
            logging.getLogger("glm4serve").warning("%s is not a setting and changes nothing%s", key,
                                                   f" (did you mean {prefix}{close[0]}?)" if close else "")


def one_line(error: Exception) -> str:
    """A settings error in one line: each field and what is wrong with it (pydantic's own takes 3 lines a field)."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
                     + ("" if "api_key" in e["loc"] else f" (got {e['input']!r:.80})") for e in error.errors())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-model":
        from glm4serve.model.random_checkpoint import make_model_main

        return make_model_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    # The level the flag or variable gives, until the settings (which may take it from the YAML) are read.
    level = getattr(args, "log_level", os.environ.get("GLM4SERVE_LOG_LEVEL", "info")).upper()
    logging.basicConfig(level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from glm4serve.api.settings import VLLM_SETTINGS_WITHOUT_EFFECT

    for flag in vllm_flags_given(args):
        why = VLLM_SETTINGS_WITHOUT_EFFECT[flag[2:].replace("-", "_")][1]
        logging.getLogger("glm4serve").info("%s (vLLM's) has no effect here: %s", flag, why)
    warn_unknown_variables(os.environ)
    try:
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as e:  # pydantic's ValidationError is a ValueError
        parser.error(f"invalid settings: {one_line(e)}")
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        return serve(settings)
    except KeyboardInterrupt:  # Ctrl-C while loading: the drain's own handling starts with the server
        raise SystemExit("glm4serve: interrupted while starting") from None


if __name__ == "__main__":
    sys.exit(main())
