"""vLLM's periodic stats line: what it says over an interval, when it stays quiet, and the server logging it."""

from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from glm4serve.api import stats_log
from glm4serve.api.stats_log import StatsLog
from glm4serve.engine.types import EngineStats
from tests.api_fakes import make_app, shutdown_engines  # noqa: F401 - shutdown_engines is an autouse fixture


def test_the_line_gives_the_intervals_throughput_and_the_engines_state_and_stays_quiet_when_idle():
    tokens = [0.0, 0.0]
    stats = EngineStats(num_running=0, num_waiting=0, kv_blocks_total=200, kv_blocks_used=0)
    log = StatsLog(lambda: tuple(tokens), lambda: stats)
    start = time.monotonic()
    assert log.line(start + 10) is None  # nothing served, nothing held
    tokens[:] = [300.0, 50.0]
    stats = EngineStats(num_running=2, num_waiting=1, kv_blocks_total=200, kv_blocks_used=50,
                        prefix_cache_queries=400, prefix_cache_hits=100)
    assert log.line(start + 20) == ("Avg prompt throughput: 30.0 tokens/s, Avg generation throughput: 5.0 tokens/s, "
                                    "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, "
                                    "Prefix cache hit rate: 25.0%")
    assert log.line(start + 30).startswith("Avg prompt throughput: 0.0 tokens/s")  # still running: still logged
    stats = EngineStats(kv_blocks_total=200)
    assert log.line(start + 40) is None
    replicas = {"a": EngineStats(num_running=1, kv_blocks_total=100, kv_blocks_used=10),
                "b": EngineStats(num_waiting=3, kv_blocks_total=100, kv_blocks_used=30)}
    assert "Running: 1 reqs, Waiting: 3 reqs, KV cache usage: 20.0%" in StatsLog(lambda: (0.0, 0.0),
                                                                                   lambda: replicas).line(start)
    assert StatsLog(lambda: (1.0, 1.0), lambda: None).line(start) is None  # the model still loads


@pytest.mark.parametrize("disabled", [False, True])
def test_the_server_logs_it_while_serving_unless_disabled(disabled, monkeypatch, caplog):
    monkeypatch.setattr(stats_log, "LOG_STATS_INTERVAL_S", 0.05)
    caplog.set_level(logging.INFO, logger="glm4serve.api")
    with TestClient(make_app(replies=["\nHi there!"], step_delay=0.05, disable_log_stats=disabled)) as client:
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).is_success
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Avg prompt throughput")]
    assert (lines == []) == disabled
