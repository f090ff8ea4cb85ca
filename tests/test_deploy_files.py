"""Dockerfile, docker-compose.yml, deploy/prometheus.yml and .dockerignore, without Docker: the files
parse, point at routes and files that exist, and the image's own command (ENTRYPOINT + CMD, with
the image's ENV) runs the server here: the demo model on first run, /health, the image's
HEALTHCHECK command, a request deadline, and exit 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from glm4serve.api.settings import ServerSettings
from glm4serve.api.shutdown import CUT_AFTER_SECONDS
from server_proc import free_port, without_model_name
from tests.api_fakes import engine_of, make_app, shutdown_engines  # noqa: F401 - shutdown_engines is autouse

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Dockerfile:
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, name: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"no {name} in the Dockerfile"
        return found[-1]

    def exec_form(self, name: str) -> list[str]:
        value = json.loads(self.last(name))  # exec form: signals reach the server, not a shell
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


def parse_dockerfile() -> Dockerfile:
    text = (REPO / "Dockerfile").read_text()
    lines, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    df = Dockerfile()
    for line in lines:
        ins, _, rest = line.strip().partition(" ")
        ins, rest = ins.upper(), rest.strip()
        df.instructions.append((ins, rest))
        if ins == "ARG":
            name, _, default = rest.partition("=")
            df.args[name] = default
        elif ins == "ENV":
            for pair in shlex.split(rest):
                k, _, v = pair.partition("=")
                df.env[k] = v
    return df


def healthcheck_argv(df: Dockerfile) -> list[str]:
    options, _, cmd = df.last("HEALTHCHECK").partition("CMD ")
    assert "--start-period=" in options  # a 9B model takes minutes to load
    return json.loads(cmd)


def url_path(command: list[str]) -> str:
    (url,) = re.findall(r"http://[^'\"\s]+", " ".join(command))
    return urlparse(url.replace("%s", "8000")).path


@pytest.fixture(scope="module")
def app_client():
    client = TestClient(make_app())
    yield client
    engine_of(client.app).shutdown()


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_slim_cpu_by_default_cuda_by_argument_non_root():
    df = parse_dockerfile()
    assert df.args["BASE_IMAGE"] == "python:3.11-slim"
    assert df.last("FROM") == "${BASE_IMAGE}"
    assert df.args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert any("--index-url" in r and "TORCH_INDEX_URL" in r for r in df.all("RUN"))
    user = df.last("USER")
    assert user not in ("root", "0") and any(user in r for r in df.all("RUN") if "useradd" in r)
    # everything the image copies is in the repo and not dropped by .dockerignore
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for rest in df.all("COPY"):
        *sources, _dest = rest.split()
        for src in sources:
            assert (REPO / src).exists(), src
            assert src.split("/")[0] not in ignored, src


def test_dockerfile_gives_a_cuda_image_a_c_compiler_for_triton():
    """Triton builds its kernels' launchers with a C compiler; a CUDA runtime base image has none, and
    without it the server would decode without its kernels (paged_decode.unsupported)."""
    df = parse_dockerfile()
    runs = [r for ins, r in df.instructions if ins == "RUN"]
    (install,) = [r for r in runs if "torch.version.cuda" in r]
    assert "apt-get install" in install and " gcc " in install
    before_user = [r for ins, r in df.instructions[: df.instructions.index(("USER", df.last("USER")))] if ins == "RUN"]
    assert install in before_user  # apt needs root


def test_the_cuda_image_recipes_pin_a_torch_at_or_above_the_projects_floor():
    """The README's and the Dockerfile's CUDA build pin a torch; pyproject.toml's floor is the oldest run."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (floor,) = [tuple(map(int, d.split(">=")[1].split("."))) for d in deps if d.startswith("torch>=")]
    recipes = (REPO / "README.md").read_text() + (REPO / "Dockerfile").read_text()
    pins = re.findall(r"TORCH_SPEC=torch==([\d.]+)", recipes)
    assert len(pins) == 2 and all(tuple(map(int, p.split(".")))[: len(floor)] >= floor for p in pins), (pins, floor)
    assert any("TORCH_SPEC" in r and "--index-url" in r for r in parse_dockerfile().all("RUN"))


def test_the_server_never_imports_transformers():
    """transformers is a test dependency only (the reference): the server's own tokenizer reads the files."""
    sources = [p for p in (REPO / "glm4serve").rglob("*.py")]
    assert sources and not [p for p in sources if re.search(r"^\s*(from|import) transformers\b", p.read_text(), re.M)]


def test_dockerfile_healthcheck_hits_a_real_route(app_client):
    argv = healthcheck_argv(parse_dockerfile())
    path = url_path(argv)
    assert path == "/health"
    assert app_client.get(path).status_code == 200


# --- docker-compose.yml and Prometheus -------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def host_mounts(service: dict) -> dict[str, str]:
    """container path -> host path (or named volume) of each mount."""
    out = {}
    for v in service.get("volumes", []):
        host, container = interpolate(v).split(":")[:2]
        out[container] = host
    return out


def test_compose_server_has_model_volume_healthcheck_restart(compose, app_client):
    server = compose["services"]["server"]
    assert server["build"] == "." and (REPO / "Dockerfile").is_file()
    mounts = host_mounts(server)
    assert mounts["/models"] == "./models"  # the user's checkpoints; docker creates the folder
    for container, host in mounts.items():
        assert host.startswith("./") or host in compose["volumes"], (container, host)
    assert server["restart"] in ("always", "unless-stopped", "on-failure")
    path = url_path(server["healthcheck"]["test"])
    assert app_client.get(path).status_code == 200 and path == "/health"
    # the command is the image's CMD shape: a config file that exists in the image
    default = interpolate(server["command"][-1])
    assert (REPO / default).is_file()
    ServerSettings(config=str(REPO / default))
    # docker stop must outwait the drain of every shipped config
    grace = int(server["stop_grace_period"].rstrip("s"))
    longest = max(ServerSettings(config=str(p)).graceful_shutdown_seconds for p in (REPO / "configs").glob("*.yaml"))
    assert grace > longest + CUT_AFTER_SECONDS


def test_compose_prometheus_scrapes_the_servers_metrics(compose, app_client):
    services = compose["services"]
    prom = services["prometheus"]
    mounts = host_mounts(prom)
    (config_arg,) = [c for c in prom["command"] if c.startswith("--config.file=")]
    container_path = config_arg.split("=", 1)[1]
    host_path = REPO / mounts[container_path]
    assert host_path.is_file()
    scrape = yaml.safe_load(host_path.read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "glm4serve"]
    metrics_path = job.get("metrics_path", "/metrics")
    r = app_client.get(metrics_path)
    assert r.status_code == 200 and "glm4serve:num_requests_running" in r.text
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "server" and host in services
    env = dict(e.split("=", 1) for e in services["server"]["environment"] if "=" in e)
    assert port == env["GLM4SERVE_PORT"] == parse_dockerfile().env["GLM4SERVE_PORT"]
    assert f"{port}:{port}" in services["server"]["ports"]


# --- the image's command, run here ---------------------------------------------------------------


def image_command() -> tuple[list[str], dict[str, str]]:
    df = parse_dockerfile()
    argv = df.exec_form("ENTRYPOINT") + df.exec_form("CMD")
    assert argv[:2] == ["glm4serve", "serve"]
    script = Path(sys.executable).with_name("glm4serve")  # the console script pip installed
    head = [str(script)] if script.exists() else [sys.executable, "-m", "glm4serve.cli"]
    return head + argv[1:], df.env


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s:\n{log.read_text()[-3000:]}")


def test_image_command_serves_the_demo_with_a_deadline_and_stops_cleanly(tmp_path):
    argv, image_env = image_command()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLM4SERVE_")}
    env.update(image_env)
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1",  # a fresh HOME: the demo is made on first run
               GLM4SERVE_HOST="127.0.0.1", GLM4SERVE_PORT=str(port),  # not 0.0.0.0:8000 on a test machine
               GLM4SERVE_KV_CACHE_MEMORY="64MiB", GLM4SERVE_REQUEST_TIMEOUT_SECONDS="1")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        # WORKDIR /app in the image holds what the repo root holds (configs/...)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 120, "/health 200", proc, log)
        text = log.read_text()
        assert "random weights" in text and "glm4serve serve --model" in text  # the first-run notice
        assert "loading weights from" in text and "weights loaded in" in text  # the load, without a TTY
        assert (tmp_path / ".cache" / "glm4serve").is_dir()
        # the image's HEALTHCHECK command itself
        check = subprocess.run([sys.executable if a == "python" else a for a in healthcheck_argv(parse_dockerfile())],
                               env=dict(env), timeout=30)
        assert check.returncode == 0
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "glm4-demo"

        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7000, "ignore_eos": True}
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - t0 < 10

        def blocks_back() -> bool:
            m = without_model_name(httpx.get(url + "/metrics").text)
            return (re.search(r"^glm4serve:kv_cache_blocks_used 0\.0$", m, re.M) is not None
                    and re.search(r"^glm4serve:request_timeout_total 1\.0$", m, re.M) is not None)

        wait_for(blocks_back, 10, "KV blocks freed after the deadline", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text()[-3000:]
