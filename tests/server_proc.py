"""Run the real server (`glm4serve serve`, uvicorn) in a subprocess on a free localhost port."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): a port the kernel handed out could be
    handed again to one of the many outgoing connections Ray's processes open before the server binds
    it (CI once lost a Ray Serve proxy so). Above Ray's worker ports (10002-19999)."""
    while True:
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def without_model_name(metrics_text: str) -> str:
    """/metrics text without the model_name label every series carries: series as the tests name them."""
    return re.sub(r",?\}", "}", re.sub(r'model_name="[^"]*",?', "", metrics_text)).replace("{}", "")


class ServerProcess:
    def __init__(self, model: Path | None, *args: str, env: dict | None = None, home: Path | None = None,
                 device: str = "cpu", dtype: str = "float32", kv_cache_memory: str | None = "64MiB"):
        """kv_cache_memory None: the server's own budget (on a GPU: what the weights leave)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "glm4serve.cli", "serve", "--port", str(self.port), "--device", device,
               "--dtype", dtype]
        if kv_cache_memory is not None:
            cmd += ["--kv-cache-memory", kv_cache_memory]
        cmd += args
        if model is not None:
            cmd += ["--model", str(model)]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if home is not None:
            full_env["HOME"] = str(home)
        # under pytest, its temp folder (conftest.py), which keeps only the last few runs
        log_dir = Path(os.environ.get("GLM4SERVE_TEST_LOGS") or tempfile.gettempdir())
        self.log_path = log_dir / f"glm4serve-test-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def wait_healthy(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.dump_stacks()
        text = self.log_path.read_text()[-6000:]
        self.stop()  # no caller holds a server that never came up
        raise TimeoutError(f"server not healthy after {timeout}s:\n{text}")

    def dump_stacks(self) -> None:
        """Every thread's stack into the server's log (its SIGUSR1), if it still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)

    def stop(self, timeout: float = 30) -> int:
        stop_process(self.proc, timeout)
        self.log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value, from /metrics."""
        out = {}
        for line in without_model_name(httpx.get(self.url + "/metrics", timeout=10).text).splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out
