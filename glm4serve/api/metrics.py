"""Prometheus metrics under the `glm4serve:` prefix, with vLLM's names so dashboards carry over.

Each app owns its CollectorRegistry (several apps in one test process must not collide). Every
series carries vLLM's `model_name` label (the served model's name), which its dashboards select on.
Gauges and the engine's own counters are read from `engine.stats()` at scrape time; the
request-level counters and histograms are fed by `RequestMetrics` as outputs stream by.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from glm4serve.engine.types import ABORT, STEP_TOKEN_BUCKETS, EngineStats, Output

PREFIX = "glm4serve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
                  200000, 500000, 1000000)


class _EngineStatsCollector(Collector):
    """The engine's series: one value each, or with several engine replicas (cluster.py) one per
    replica under a `replica` label."""

    def __init__(self, stats: Callable[[], EngineStats | dict[str, EngineStats] | None]):
        self._stats = stats

    def describe(self):
        # Registration asks for names only; the engine may not exist yet.
        return self._families(EngineStats())

    def collect(self):
        return self._families(self._stats() or EngineStats(alive=False))

    @staticmethod
    def _families(stats: EngineStats | dict[str, EngineStats]):
        by_replica = None if isinstance(stats, EngineStats) else sorted(stats.items())
        for kind, name, doc, value in _ENGINE_SERIES:
            if by_replica is None:
                yield kind(PREFIX + name, doc, value=value(stats))
                continue
            family = kind(PREFIX + name, doc, labels=["replica"])
            for replica, s in by_replica:
                family.add_metric([replica], value(s))
            yield family
        # vLLM's name (a histogram, its `_total` notwithstanding): how full the engine's steps run
        name, doc = PREFIX + "iteration_tokens_total", "Tokens per engine step."
        if by_replica is None:
            yield HistogramMetricFamily(name, doc, buckets=_step_buckets(stats), sum_value=stats.step_tokens)
            return
        family = HistogramMetricFamily(name, doc, labels=["replica"])
        for replica, s in by_replica:
            family.add_metric([replica], _step_buckets(s), s.step_tokens)
        yield family


def _step_buckets(stats: EngineStats) -> list[tuple[str, int]]:
    """EngineStats' step counts per bucket -> Prometheus' cumulative (le, count) pairs, +Inf last."""
    bounds = [str(float(b)) for b in STEP_TOKEN_BUCKETS] + ["+Inf"]
    return list(zip(bounds, itertools.accumulate(stats.step_token_counts)))


# (family, name, help, value) of the series read from EngineStats at scrape time
_ENGINE_SERIES = [
    (GaugeMetricFamily, "num_requests_running", "Requests in the running batch.", lambda s: s.num_running),
    (GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting),
    (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
     lambda s: s.kv_cache_usage),
    (GaugeMetricFamily, "kv_cache_blocks_used", "KV cache blocks in use.", lambda s: s.kv_blocks_used),
    (GaugeMetricFamily, "kv_cache_blocks_total", "KV cache blocks in the pool.", lambda s: s.kv_blocks_total),
    (CounterMetricFamily, "num_preemptions", "Preempted sequences since start.", lambda s: s.num_preemptions_total),
    (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     lambda s: s.prefix_cache_queries),
    (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     lambda s: s.prefix_cache_hits),
    (CounterMetricFamily, "spec_decode_num_draft_tokens", "Tokens drafted by speculative decoding.",
     lambda s: s.spec_draft_tokens),
    (CounterMetricFamily, "spec_decode_num_accepted_tokens", "Drafted tokens the sampler kept.",
     lambda s: s.spec_accepted_tokens),
]


class _WithModelName(Collector):
    """Each series of `series` with a model_name label (prometheus_client has no constant labels)."""

    def __init__(self, series: CollectorRegistry, model_name: str):
        self.series, self.model_name = series, model_name

    def collect(self):
        for family in self.series.collect():  # made anew at each scrape: ours to relabel
            family.samples = [s._replace(labels={"model_name": self.model_name, **s.labels}) for s in family.samples]
            yield family


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | dict[str, EngineStats] | None], model_name: str):
        r = self._series = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WithModelName(r, model_name))
        # prometheus_client appends `_total` to counters: these expose e.g. glm4serve:prompt_tokens_total.
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished choices by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between tokens of a choice.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time spent waiting to be scheduled.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        # Overload and limits (api/gate.py, serving.py): exposed as ..._total.
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before running, by reason "
                                "(queue_full, draining, body_too_large).", ["reason"], registry=r)
        self.timeouts = Counter(PREFIX + "request_timeout", "Requests aborted at their deadline.", registry=r)
        # read from the app's Gate at scrape time (app.py sets the function)
        self.admitted = Gauge(PREFIX + "num_requests_admitted", "Generation requests admitted and not yet "
                              "answered (running, queued or streaming); capped by the queue limit.", registry=r)
        self.request_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Prompt length per request.",
                                               buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                                   "Generated tokens per request (all choices).",
                                                   buckets=_TOKEN_BUCKETS, registry=r)
        # A request's time split as vLLM splits it: queue + prefill = time to first token,
        # prefill + decode = inference; per-token time is each choice's own decode pace.
        self.prefill_time = Histogram(PREFIX + "request_prefill_time_seconds",
                                      "Admission to first token (time to first token less queue time).",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram(PREFIX + "request_decode_time_seconds", "First token to last token.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram(PREFIX + "request_inference_time_seconds", "Admission to last token.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds",
                              "Each choice's mean time per token after its first (choices of 2+ tokens).",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.max_generation_tokens = Histogram(PREFIX + "request_max_num_generation_tokens",
                                               "Generated tokens of a request's longest choice.",
                                               buckets=_TOKEN_BUCKETS, registry=r)
        self.params_n = Histogram(PREFIX + "request_params_n", "The n of each request.",
                                  buckets=(1, 2, 5, 10, 20), registry=r)
        self.params_max_tokens = Histogram(PREFIX + "request_params_max_tokens", "The max_tokens each request ran "
                                           "with (its default filled in).", buckets=_TOKEN_BUCKETS, registry=r)
        r.register(_EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def token_totals(self) -> tuple[float, float]:
        """The prompt and generated tokens served since start."""
        return tuple(self._series.get_sample_value(PREFIX + name) or 0.0
                     for name in ("prompt_tokens_total", "generation_tokens_total"))

    def start_request(self, n: int = 1, max_tokens: int | None = None) -> "RequestMetrics":
        self.params_n.observe(n)
        if max_tokens is not None:
            self.params_max_tokens.observe(max_tokens)
        return RequestMetrics(self, n)


@dataclass
class _ChoiceTiming:
    first: float  # when its first token came
    last: float  # and its latest
    tokens: int = 0


class RequestMetrics:
    """Timing of one engine request (all its choices), fed one Output at a time."""

    def __init__(self, metrics: Metrics, n: int = 1):
        self.m = metrics
        self.n = n  # its choices
        self.arrival = time.perf_counter()
        self.first_token: float | None = None  # its first Output's (a choice's, or a prompt's score alone)
        self.choices: dict[int, _ChoiceTiming] = {}  # by index, once a choice has a token
        self.num_prompt_tokens = 0
        self.queue_time: float | None = None
        self.counted: set[int] = set()  # choices whose finish reason is counted
        self._closed = False

    def on_output(self, out: Output) -> None:
        now = time.perf_counter()
        n = len(out.token_ids)
        if out.queue_time is not None and self.queue_time is None:  # on every Output once admitted
            self.queue_time = out.queue_time
            self.m.queue_time.observe(out.queue_time)
        if self.first_token is None:
            self.first_token = now
            self.m.ttft.observe(now - self.arrival)
            self.num_prompt_tokens = out.num_prompt_tokens
            self.m.prompt_tokens.inc(out.num_prompt_tokens)
        if n:
            choice = self.choices.get(out.index)
            if choice is None:
                choice = self.choices[out.index] = _ChoiceTiming(now, now)
            else:
                gap = (now - choice.last) / n  # several tokens in one step share the step's time
                for _ in range(n):
                    self.m.itl.observe(gap)
            choice.last = now
            choice.tokens += n
        self.m.generation_tokens.inc(n)
        if out.finish_reason is not None:
            self.finish(out.index, out.finish_reason)

    def finish(self, index: int, reason: str) -> None:
        """Count choice `index` as finished for `reason`, once: the API's early end of a reply comes before the
        engine's 'abort' of that choice, and is what the client got."""
        if index not in self.counted:
            self.counted.add(index)
            self.m.request_success.labels(finished_reason=reason).inc()

    def close(self, unfinished: str = ABORT) -> None:
        """The request is left: its choices not finished yet are counted as `unfinished` (the client gone, the
        deadline, the engine's failure)."""
        if self._closed:
            return
        self._closed = True
        for index in range(self.n):
            self.finish(index, unfinished)
        if self.first_token is None:
            return  # failed or aborted before any output: no latency to report
        self.m.e2e.observe(time.perf_counter() - self.arrival)
        self.m.request_prompt_tokens.observe(self.num_prompt_tokens)
        choices = self.choices.values()
        self.m.request_generation_tokens.observe(sum(c.tokens for c in choices))
        self.m.max_generation_tokens.observe(max((c.tokens for c in choices), default=0))
        if self.choices:
            last = max(c.last for c in choices)
            admitted = self.arrival + (self.queue_time or 0.0)
            self.m.prefill_time.observe(max(self.first_token - admitted, 0.0))
            self.m.decode_time.observe(last - self.first_token)
            self.m.inference_time.observe(max(last - admitted, 0.0))
        for c in choices:
            if c.tokens > 1:
                self.m.tpot.observe((c.last - c.first) / (c.tokens - 1))
