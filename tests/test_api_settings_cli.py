"""ServerSettings precedence (CLI > env > YAML > defaults) and the `glm4serve` command line."""

from __future__ import annotations

import json
import logging
import socket
import sys
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from glm4serve import cli
from glm4serve.api.settings import ServerSettings, parse_bytes
from tests.api_fakes import shutdown_engines, start_engine  # noqa: F401 - shutdown_engines is an autouse fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("GLM4SERVE_"):
            monkeypatch.delenv(key)


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


def test_defaults():
    s = ServerSettings()
    assert (s.model, s.host, s.port, s.dtype, s.device, s.api_key) == (None, "127.0.0.1", 8000, "auto", "auto", None)
    assert s.max_model_len is None and s.kv_cache_memory is None


def test_precedence_cli_over_env_over_yaml_over_defaults(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "port: 9000\nhost: 0.0.0.0\nblock_size: 32\n")
    assert ServerSettings(config=path).port == 9000  # YAML over default
    monkeypatch.setenv("GLM4SERVE_PORT", "9100")
    s = ServerSettings(config=path)
    assert (s.port, s.host, s.block_size, s.max_num_seqs) == (9100, "0.0.0.0", 32, ServerSettings().max_num_seqs)
    assert ServerSettings(config=path, port=9200).port == 9200  # CLI over env
    monkeypatch.setenv("GLM4SERVE_CONFIG", path)  # the YAML path itself may come from the env
    assert ServerSettings().block_size == 32


def test_memory_sizes():
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes(4096) == 4096
    assert ServerSettings(kv_cache_memory="1KiB").kv_cache_memory == 1024
    for bad in ("lots", "-1GiB", "0", "2 parsecs"):
        with pytest.raises(ValidationError):
            ServerSettings(kv_cache_memory=bad)


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValidationError):
        ServerSettings(config=write_yaml(tmp_path, "no_such_key: 1\n"))
    with pytest.raises(ValidationError):
        ServerSettings(dtype="int4")
    with pytest.raises(FileNotFoundError):
        ServerSettings(config=str(tmp_path / "missing.yaml"))


def test_demo_config_loads():
    s = ServerSettings(config=str(REPO / "configs" / "demo.yaml"))
    assert s.model is None and s.kv_cache_memory == 1024**3 and s.max_model_len == 8192


def test_cli_flags_only_override_what_they_name(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "port: 9000\nmax_num_seqs: 3\n")
    monkeypatch.setenv("GLM4SERVE_HOST", "0.0.0.0")
    args = cli.build_parser().parse_args(["serve", "--config", path, "--port", "7000", "--kv-cache-memory", "2GiB",
                                          "--max-model-len", "512", "--served-model-name", "glm"])
    s = cli.settings_from_args(args)
    assert (s.port, s.max_num_seqs, s.host) == (7000, 3, "0.0.0.0")
    assert (s.kv_cache_memory, s.max_model_len, s.served_model_name) == (2 * 1024**3, 512, "glm")


def test_a_vllm_command_line_is_taken(tmp_path, monkeypatch):
    """`vllm serve MODEL` with flags a GLM-4 deployment carries: the model as the positional argument,
    --gpu-memory-utilization taken, the flags that change nothing here taken and logged as such."""
    argv = ["serve", "/data/glm-4-9b-chat", "--trust-remote-code", "--gpu-memory-utilization", "0.85",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--enable-lora", "--max-lora-rank", "64",
            "--max-model-len", "32768"]
    args = cli.build_parser().parse_args(argv)
    s = cli.settings_from_args(args)
    assert (s.model, s.gpu_memory_utilization, s.max_model_len) == ("/data/glm-4-9b-chat", 0.85, 32768)
    assert cli.vllm_flags_given(args) == ["--trust-remote-code", "--enable-lora", "--max-lora-rank",
                                          "--enable-auto-tool-choice", "--tool-call-parser"]
    assert ServerSettings().gpu_memory_utilization == 0.9  # vLLM's default
    named = cli.settings_from_args(cli.build_parser().parse_args(["serve", "/m", "--served-model-name", "a", "b"]))
    assert (named.model, named.model_name, named.model_aliases) == ("/m", "a", ["b"])
    unnamed = cli.settings_from_args(cli.build_parser().parse_args(["serve", "--served-model-name", "a", "b"]))
    assert (unnamed.model, unnamed.model_aliases) == (None, ["b"])  # the second name is no model path
    assert ServerSettings(served_model_name=["a", "b"]).served_model_name == "a b"  # YAML's list
    # unnamed, a hub id is served as given (what a client written for vLLM sends), a local folder by its name
    assert ServerSettings(model="THUDM/glm-4-9b-chat").model_name == "THUDM/glm-4-9b-chat"
    assert ServerSettings(model="/data/glm-4-9b-chat").model_name == "glm-4-9b-chat"  # a path, there or not
    (tmp_path / "org" / "glm-4-9b-chat").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ServerSettings(model="org/glm-4-9b-chat").model_name == "glm-4-9b-chat"  # a folder here, not the hub
    monkeypatch.chdir(tmp_path / "org" / "glm-4-9b-chat")
    assert ServerSettings(model=".").model_name == "glm-4-9b-chat"
    same = cli.build_parser().parse_args(["serve", "/m", "--model", "/m"])
    assert cli.settings_from_args(same).model == "/m"
    with pytest.raises(ValueError, match="two models given"):
        cli.settings_from_args(cli.build_parser().parse_args(["serve", "/a", "--model", "/b"]))
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ValidationError):
            cli.settings_from_args(cli.build_parser().parse_args(["serve", "--gpu-memory-utilization", bad]))


def test_a_vllm_config_file_is_taken(tmp_path, caplog):
    """vLLM's --config YAML writes keys as its flags, and may carry settings that change nothing here."""
    import logging

    path = write_yaml(tmp_path, "model: /data/glm-4-9b-chat\nmax-model-len: 32768\ngpu-memory-utilization: 0.8\n"
                                "served-model-name: glm-4\ntrust-remote-code: true\ntool-call-parser: hermes\n")
    with caplog.at_level(logging.INFO, logger="glm4serve"):
        s = ServerSettings(config=path)
    assert (s.model, s.max_model_len, s.gpu_memory_utilization, s.model_name) == (
        "/data/glm-4-9b-chat", 32768, 0.8, "glm-4")
    assert "trust_remote_code (vLLM's)" in caplog.text and "tool_call_parser (vLLM's)" in caplog.text
    with pytest.raises(ValidationError, match="swap_space"):  # a vLLM setting that would change something here
        ServerSettings(config=write_yaml(tmp_path, "swap-space: 4\n"))


def test_make_model_is_delegated_untouched(monkeypatch):
    seen = []
    fake = types.ModuleType("glm4serve.model.random_checkpoint")
    fake.make_model_main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "glm4serve.model.random_checkpoint", fake)
    assert cli.main(["make-model", "out", "--layers", "1", "--help-me"]) == 0
    assert seen == [["out", "--layers", "1", "--help-me"]]


def test_serve_builds_engine_and_runs_uvicorn(monkeypatch):
    built = []
    fake_server = types.ModuleType("glm4serve.server")

    def build_engine(settings):  # the real engine for these settings, over a scripted model runner
        engine = start_engine(settings, 321)
        built.append((settings, engine))
        return engine, engine.engine.tokenizer, "served-name", 321

    fake_server.build_engine = build_engine
    monkeypatch.setitem(sys.modules, "glm4serve.server", fake_server)
    ran = {}
    import uvicorn

    # serve() runs uvicorn's Server (with the drain on SIGTERM, api/shutdown.py)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.update(
        app=self.config.app, host=self.config.host, port=self.config.port))
    assert cli.main(["serve", "--port", "8123", "--host", "0.0.0.0", "--api-key", "k", "--max-num-seqs", "3"]) == 0
    [(settings, engine)] = built
    assert settings.port == 8123 and settings.api_key == "k"
    assert engine.engine.scheduler.cfg.max_num_seqs == 3
    assert (ran["host"], ran["port"]) == ("0.0.0.0", 8123)
    client = TestClient(ran["app"])
    models = client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
    assert models["data"][0]["id"] == "served-name" and models["data"][0]["max_model_len"] == 321
    assert not engine.is_alive  # the engine loop is stopped when the server returns


def test_the_log_level_is_a_setting_as_any_other(monkeypatch, tmp_path):
    """A flag, a variable or a YAML key, as every setting; the log takes it before serving starts."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # put back after the test
    got = []
    monkeypatch.setattr(cli, "serve", lambda settings: got.append((settings.log_level, root.level)) or 0)
    f = tmp_path / "s.yaml"
    f.write_text("log_level: warning\n")
    assert cli.main(["serve", "--config", str(f)]) == 0
    monkeypatch.setenv("GLM4SERVE_LOG_LEVEL", "error")
    assert cli.main(["serve", "--config", str(f)]) == 0
    assert cli.main(["serve", "--config", str(f), "--log-level", "debug"]) == 0
    assert got == [("warning", logging.WARNING), ("error", logging.ERROR), ("debug", logging.DEBUG)]


def test_serve_help_shows_each_settings_default(capsys):
    """argparse cannot show them (the flags' own default is SUPPRESS, for the env and YAML to apply)."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, default in (("--max-num-seqs MAX_NUM_SEQS", "64"), ("--port PORT", "8000"), ("--log-level", "info"),
                          ("--max-request-body-bytes MAX_REQUEST_BODY_BYTES", "16MiB"),
                          ("--enable-prefix-caching, --no-enable-prefix-caching", "True")):
        assert f"(default: {default})" in text.split(flag, 1)[1].split(" --", 1)[0], flag


def test_serve_with_invalid_setting_exits_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--dtype", "int4"])
    assert exc.value.code == 2 and "dtype" in capsys.readouterr().err


@pytest.mark.parametrize("env, file, says", [
    ({"GLM4SERVE_MODEL": ""}, None, "invalid settings: model: model is empty: name a checkpoint folder or hub id, "
                                    "or leave it unset for the demo (got '')"),
    ({"GLM4SERVE_API_KEY": " "}, None, "invalid settings: api_key: api_key is empty: give the key clients must "
                                       "send, or leave it unset for none"),
    ({"GLM4SERVE_MAX_NUM_SEQS": "0", "GLM4SERVE_PORT": "x"}, None,
     "invalid settings: max_num_seqs: Input should be greater than or equal to 1 (got '0'); port: Input should be "
     "a valid integer, unable to parse string as an integer (got 'x')"),
    ({}, "max_model_len: 4096\n  bad: [\n", "is not valid YAML: mapping values are not allowed here"),
    ({}, "- a\n- b\n", "must hold a mapping of settings, not a list"),
])
def test_a_bad_setting_from_the_environment_or_a_file_is_one_line_naming_it(monkeypatch, tmp_path, capsys, env, file,
                                                                           says):
    """An .env line left empty or a YAML typo, as a compose deployment meets them: exit 2 and one line, no
    traceback, nothing served (not the working directory; not /v1 without a key)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["serve"]
    if file is not None:
        (tmp_path / "c.yaml").write_text(file)
        argv += ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and says in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_an_empty_served_name_flag_is_refused_as_the_variable_is(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--served-model-name", ""])
    assert exc.value.code == 2 and "served_model_name needs one or more names" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_is_one_line_not_a_traceback(monkeypatch):
    def build_engine(settings):
        raise KeyboardInterrupt

    fake_server = types.ModuleType("glm4serve.server")
    fake_server.build_engine = build_engine
    monkeypatch.setitem(sys.modules, "glm4serve.server", fake_server)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--port", "0"])
    assert exc.value.code == "glm4serve: interrupted while starting"


def test_a_variable_that_names_no_setting_is_warned_of_with_what_was_meant(caplog):
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        cli.warn_unknown_variables({"GLM4SERVE_MAX_MODEL_LENGTH": "4096", "GLM4SERVE_PORT": "1", "PATH": "/bin",
                                    "GLM4SERVE_ZZZ": "1", "GLM4SERVE_MAX_CPU_ISA": "avx2"})
    assert [r.getMessage() for r in caplog.records] == [
        "GLM4SERVE_MAX_MODEL_LENGTH is not a setting and changes nothing (did you mean GLM4SERVE_MAX_MODEL_LEN?)",
        "GLM4SERVE_ZZZ is not a setting and changes nothing"]


def test_an_address_the_server_cannot_listen_on_is_refused_before_the_model_loads(monkeypatch):
    fake_server = types.ModuleType("glm4serve.server")
    fake_server.build_engine = lambda settings: pytest.fail("the model loaded for an address in use")
    monkeypatch.setitem(sys.modules, "glm4serve.server", fake_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            cli.main(["serve", "--port", str(port)])
    assert exc.value.code == (f"glm4serve: cannot serve: --host 127.0.0.1 --port {port}: cannot listen there: "
                              "Address already in use (--log-level debug shows where)")
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--host", "no-such-host.invalid"])
    assert str(exc.value.code).startswith("glm4serve: cannot serve: --host no-such-host.invalid: ")


def test_a_setting_the_model_cannot_be_served_with_exits_with_one_line(monkeypatch):
    from glm4serve.engine.config import plan_kv_cache

    fake_server = types.ModuleType("glm4serve.server")

    def build_engine(settings):  # the KV cache planned as the real build plans it
        plan_kv_cache(settings, 131072, 4096, "cpu")

    fake_server.build_engine = build_engine
    monkeypatch.setitem(sys.modules, "glm4serve.server", fake_server)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--num-kv-blocks", "4", "--block-size", "16", "--max-model-len", "256"])
    assert exc.value.code == ("glm4serve: cannot serve: max_model_len 256 needs more KV cache than the budget "
                              "holds (64 tokens): raise kv_cache_memory or lower max_model_len (--log-level debug shows where)")


def test_the_gemv_kernels_are_on_by_default_and_a_flag_turns_them_off():
    def of(*flags):
        return cli.settings_from_args(cli.build_parser().parse_args(["serve", *flags])).gemv_kernels

    assert ServerSettings().gemv_kernels is True and of() is True
    assert of("--no-gemv-kernels") is False and of("--gemv-kernels") is True


def test_hf_overrides_from_the_command_line_the_environment_or_yaml(monkeypatch, tmp_path):
    """vLLM's --hf-overrides: a JSON object of config.json keys (GLM-4-0414's YaRN, say)."""
    yarn = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    flag = cli.settings_from_args(cli.build_parser().parse_args(["serve", "--hf-overrides", json.dumps(yarn)]))
    assert flag.hf_overrides == yarn and flag.engine_args().hf_overrides == yarn
    monkeypatch.setenv("GLM4SERVE_HF_OVERRIDES", json.dumps(yarn))
    assert ServerSettings().hf_overrides == yarn
    monkeypatch.delenv("GLM4SERVE_HF_OVERRIDES")
    assert ServerSettings(config=write_yaml(tmp_path, "hf_overrides:\n  max_position_embeddings: 8192\n")
                          ).hf_overrides == {"max_position_embeddings": 8192}
    assert ServerSettings().hf_overrides == {}
    for bad in ('["rope_scaling"]', "{not json"):
        with pytest.raises((ValidationError, ValueError)):
            cli.settings_from_args(cli.build_parser().parse_args(["serve", "--hf-overrides", bad]))


def test_the_kv_cache_dtype_is_vllms_flag():
    s = cli.settings_from_args(cli.build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"]))
    assert s.engine_args().kv_cache_dtype == "fp8" and ServerSettings().engine_args().kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):  # argparse's choices: fp8_e5m2 is not served
        cli.build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e5m2"])


def test_the_long_prefill_threshold_is_vllms_flag():
    s = cli.settings_from_args(cli.build_parser().parse_args(["serve", "--long-prefill-token-threshold", "256"]))
    assert s.scheduler_config(4096, "cpu").long_prefill_token_threshold == 256
    assert ServerSettings().scheduler_config(4096, "cpu").long_prefill_token_threshold == 0  # vLLM's default
    with pytest.raises(ValidationError):
        cli.settings_from_args(cli.build_parser().parse_args(["serve", "--long-prefill-token-threshold", "-1"]))
