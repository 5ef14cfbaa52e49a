"""Snark's Prometheus metrics (served as ``GET /metrics`` by ``operations.py``), names in vLLM's style
with a ``snark:`` prefix.

Each app owns its own ``CollectorRegistry`` (not prometheus_client's global one), so several apps in
one process (tests, embedders) never collide. Request metrics come from the engine's listener hook,
called in the worker thread when a request leaves a batch; the gauges read the engine when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from snark.engine.base import Engine
from snark.engine.request import GenerationRequest, RequestState

# vLLM's buckets, so dashboards built for it read Snark's histograms the same way.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
_TTS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _CacheCounters(Collector):
    """vLLM's cache counters, read from the engine when scraped: prompt tokens looked up in the prefix
    cache and found there; images looked up in the vision encoder cache and found there."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        counts = self.engine.cache_counts or {}
        described = {
            "prefix": ("prefix_cache", "Prompt tokens", "prefix cache"),
            "mm": ("mm_cache", "Images", "vision encoder cache"),
        }
        for key, (queries, hits) in counts.items():
            name, what, where = described[key]
            yield CounterMetricFamily(f"snark:{name}_queries", f"{what} looked up in the {where}.", value=queries)
            yield CounterMetricFamily(f"snark:{name}_hits", f"{what} found in the {where}.", value=hits)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "snark:time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "snark:time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            buckets=_TPOT_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "snark:e2e_request_latency_seconds",
            "From arrival to the last token, for finished requests.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            # TTFT's fine buckets: on a healthy server most waits are milliseconds.
            "snark:request_queue_time_seconds",
            "Time spent waiting for a batch.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "snark:prompt_tokens", "Prefilled prompt tokens, image and video tokens included.", registry=registry
        )
        self.generation_tokens = Counter("snark:generation_tokens", "Generated tokens.", registry=registry)
        self.requests_finished = Counter(
            "snark:request_success",
            "Requests that ended normally, by finish reason (stop, length).",
            ["finished_reason"],
            registry=registry,
        )
        self.requests_cancelled = Counter(
            "snark:request_cancelled",
            "Requests cancelled while running (client gone, timeout, shutdown).",
            registry=registry,
        )
        self.requests_failed = Counter(
            "snark:request_failed", "Requests whose batch raised an error.", registry=registry
        )
        running = Gauge("snark:num_requests_running", "Requests in the batch being generated.", registry=registry)
        waiting = Gauge("snark:num_requests_waiting", "Requests queued for the next batch.", registry=registry)
        running.set_function(lambda: engine.num_running)
        waiting.set_function(lambda: engine.num_waiting)
        kv_usage = Gauge(
            "snark:kv_cache_usage_perc",
            "Share of the KV cache budget the running rows hold (0 to 1).",
            registry=registry,
        )
        kv_usage.set_function(lambda: engine.kv_cache_usage)
        registry.register(_CacheCounters(engine))
        self.tts_seconds = Histogram(
            "snark:tts_seconds",
            "Wall time to synthesize one spoken response, first to last audio chunk.",
            buckets=_TTS_BUCKETS,
            registry=registry,
        )
        self.time_to_first_audio = Histogram(
            "snark:time_to_first_audio_seconds",
            "From a spoken request's arrival to its first audio byte (WAV header excluded).",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.tts_real_time_factor = Histogram(
            "snark:tts_real_time_factor",
            "Synthesis time over the length of the audio, per sentence (below 1 keeps up with playback).",
            buckets=_RTF_BUCKETS,
            registry=registry,
        )
        engine.add_listener(self.observe_request)

    def observe_request(self, request: GenerationRequest) -> None:
        """The engine listener: runs in the worker thread as each request leaves its batch."""
        if request.scheduled_at is None:  # never reached a batch: nothing was computed for it
            return
        self.queue_time.observe(request.queue_s)
        self.prompt_tokens.inc(request.prompt.num_tokens)
        self.generation_tokens.inc(request.completion_tokens)
        if request.state is RequestState.CANCELLED:
            self.requests_cancelled.inc()
            return
        if request.state is RequestState.FAILED:
            self.requests_failed.inc()
            return
        reason = request.finish_reason.value if request.finish_reason is not None else "stop"
        self.requests_finished.labels(finished_reason=reason).inc()
        finished_at = request.finished_at or time.perf_counter()
        self.e2e_latency.observe(finished_at - request.arrived_at)
        if request.first_token_at is not None:
            self.time_to_first_token.observe(request.first_token_at - request.arrived_at)
            if request.completion_tokens > 1:
                self.time_per_output_token.observe(
                    (finished_at - request.first_token_at) / (request.completion_tokens - 1)
                )

    def observe_synthesis(self, synthesis_s: float, audio_s: float) -> None:
        """The synthesis pool's hook: runs in its worker after each sentence."""
        self.tts_real_time_factor.observe(synthesis_s / audio_s)


class WithoutCreated:
    """A registry's families without the ``*_created`` samples (the creation time of each counter and
    histogram): vLLM's /metrics has none, and they double the lines a scrape returns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():  # each collect() builds fresh families: safe to edit
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family
