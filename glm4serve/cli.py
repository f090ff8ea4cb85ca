"""`glm4serve serve ...` (the OpenAI-compatible server) and `glm4serve make-model ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from glm4serve import __version__

# (flag, ServerSettings field, type, help); every flag defaults to "not given" so that env
# variables and the YAML file still apply to what the command line leaves out.
_SERVE_OPTIONS = [
    ("--model", "model", str, "checkpoint folder or hub id (default: the built-in demo model)"),
    ("--host", "host", str, "bind address (default 127.0.0.1)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--max-model-len", "max_model_len", int, "context length to serve (default: the model's)"),
    ("--served-model-name", "served_model_name", str, "model id clients send and /v1/models lists"),
    ("--api-key", "api_key", str, "require `Authorization: Bearer KEY` on /v1/*"),
    ("--kv-cache-memory", "kv_cache_memory", str, "KV cache size, bytes or like 2GiB"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--max-num-seqs", "max_num_seqs", int, "most sequences in one batch"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "most tokens in one engine step"),
    ("--enable-prefix-caching", "enable_prefix_caching", bool,
     "reuse the KV cache of prompt prefixes seen before (default on; --no-enable-prefix-caching turns it off)"),
    ("--sse-ping-seconds", "sse_ping_seconds", float, "keep-alive comment interval on streams (0 = off)"),
    ("--graceful-shutdown-seconds", "graceful_shutdown_seconds", float, "time in-flight requests get on SIGTERM"),
    ("--max-waiting-requests", "max_waiting_requests", int,
     "requests that may queue beyond the running batch; more get 429 (default 256)"),
    ("--request-timeout-seconds", "request_timeout_seconds", float,
     "stop a request after this long (408, or an error event when streaming; default: no limit)"),
    ("--max-request-body-bytes", "max_request_body_bytes", str, "largest request body, bytes or like 16MiB (413)"),
    ("--max-messages", "max_messages", int, "most messages in one chat request"),
    ("--max-n", "max_n", int, "most choices (n) in one request"),
    ("--max-prompts", "max_prompts", int, "most prompts in one /v1/completions request"),
    ("--max-tokens-limit", "max_tokens_limit", int, "cap on max_tokens (default: the context length)"),
    ("--max-tools", "max_tools", int, "most tools in one chat request"),
    ("--max-stop", "max_stop", int, "most stop strings in one request"),
    ("--cors-allowed-origins", "cors_allowed_origins", str,
     "comma-separated origins allowed by CORS, or '*' (default: CORS off)"),
    ("--config", "config", str, "YAML file with any of these settings (CLI > env > YAML > defaults)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4serve", description="OpenAI-compatible server for GLM-4 models")
    parser.add_argument("--version", action="version", version=f"glm4serve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    for flag, dest, type_, help_ in _SERVE_OPTIONS:
        if type_ is bool:  # --flag / --no-flag
            serve.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_)
        else:
            serve.add_argument(flag, dest=dest, type=type_, default=argparse.SUPPRESS, help=help_)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # Listed for --help only: main() hands its arguments to make_model_main untouched.
    commands.add_parser("make-model", help="write a small random GLM-4 checkpoint (see make-model --help)",
                        add_help=False)
    return parser


def settings_from_args(args: argparse.Namespace):
    from glm4serve.api.settings import ServerSettings

    given = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_OPTIONS if hasattr(args, dest)}
    return ServerSettings(**given)


def serve(settings, log_level: str = "info") -> None:
    from glm4serve.api.app import create_app
    from glm4serve.api.shutdown import run_server
    from glm4serve.server import build_engine  # lazy: loads torch and the model

    engine, tokenizer, model_name, max_model_len = build_engine(settings)
    app = create_app(engine, tokenizer, settings, model_name, max_model_len)
    try:
        run_server(app, settings, log_level)  # returns after SIGTERM and the drain
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (torch reads it once): CPU tensors of 2 MB and more on transparent
    # huge pages, as torch's allocator can do. Decode streams every weight once a token, and on
    # 4 KB pages a VM pays a nested page walk per page: measured 1-3% faster decode (BENCHMARKS.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-model":
        from glm4serve.model.random_checkpoint import make_model_main

        return make_model_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as e:  # pydantic's ValidationError is a ValueError
        parser.error(f"invalid settings: {e}")
    serve(settings, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
