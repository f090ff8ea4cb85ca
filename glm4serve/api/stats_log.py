"""vLLM's periodic log line of the engine's work, for operators who read the server's log rather than its
/metrics: every LOG_STATS_INTERVAL_S, while the engine has or had work in it, the prompt and generation
throughput over the interval, the requests running and waiting, the KV cache's use and the prefix cache's
hit rate since start. `--disable-log-stats` turns it off, as in vLLM."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from glm4serve.engine.types import EngineStats

log = logging.getLogger("glm4serve.api")

LOG_STATS_INTERVAL_S = 10.0  # vLLM's VLLM_LOG_STATS_INTERVAL


class StatsLog:
    """tokens: the prompt and generated tokens served since start; stats: the engine's (None while it loads)."""

    def __init__(self, tokens: Callable[[], tuple[float, float]],
                 stats: Callable[[], EngineStats | dict[str, EngineStats] | None]):
        self._tokens, self._stats = tokens, stats
        self._last = (*tokens(), time.monotonic())

    def line(self, now: float) -> str | None:
        """The line for the interval since the last call; None when the engine did nothing and holds nothing."""
        prompt, generated = self._tokens()
        last_prompt, last_generated, last_time = self._last
        self._last = (prompt, generated, now)
        raw = self._stats()
        if raw is None:
            return None
        stats = raw if isinstance(raw, EngineStats) else EngineStats.total(raw.values())
        moved = prompt > last_prompt or generated > last_generated
        if not moved and stats.num_running == 0 and stats.num_waiting == 0:
            return None
        seconds = max(now - last_time, 1e-9)
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        return (f"Avg prompt throughput: {(prompt - last_prompt) / seconds:.1f} tokens/s, "
                f"Avg generation throughput: {(generated - last_generated) / seconds:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%, Prefix cache hit rate: {100 * hit_rate:.1f}%")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(LOG_STATS_INTERVAL_S)
            try:
                line = self.line(time.monotonic())
            except Exception:  # a log line must not take the server down
                log.exception("the stats log line failed")
                continue
            if line is not None:
                log.info(line)
