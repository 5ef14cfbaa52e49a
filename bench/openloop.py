"""The open-loop workload (``--workload poisson``): requests arrive on a seeded Poisson schedule
whatever the server's pace, each asking for one of a few output lengths, so a server that makes new
requests wait for old ones shows it in their time to first token.

The schedule and the lengths are pure functions of the seed: two servers get the same load.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from bench.report import RequestTiming, latency_percentiles, percentile
from bench.runners import Send, send_or_record_failure
from bench.runs import Measured

SHORT_TOKENS = 32  # requests asking for at most this many tokens are also reported on their own


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # when to send it, after the run's start
    max_tokens: int


def poisson_arrivals(count: int, rate_per_s: float, seed: int) -> list[float]:
    """Send times, in seconds after the start: the first at once, then exponential gaps of mean
    ``1 / rate_per_s`` (arrivals of a Poisson process)."""
    rng = random.Random(f"arrivals:{seed}")  # its own stream: the lengths do not shift the times
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate_per_s)
    return times


def output_lengths(count: int, choices: list[int], seed: int) -> list[int]:
    """Each request's ``max_tokens``, drawn uniformly from ``choices``."""
    rng = random.Random(f"lengths:{seed}")
    return [rng.choice(choices) for _ in range(count)]


def poisson_plan(count: int, *, rate_per_s: float, choices: list[int], seed: int) -> list[PlannedRequest]:
    arrivals = poisson_arrivals(count, rate_per_s, seed)
    lengths = output_lengths(count, choices, seed)
    return [PlannedRequest(at, tokens) for at, tokens in zip(arrivals, lengths, strict=True)]


async def run_open_loop(send: Send, plan: list[PlannedRequest]) -> tuple[list[RequestTiming], float, list[float]]:
    """Send request ``i`` (prompt ``i``) at ``plan[i].at_s`` without waiting for earlier ones to end.
    Returns the timings in plan order, the wall time to the last reply, and how late each request
    was sent: a client that fell behind its own schedule shows there, not as server latency."""
    started = time.perf_counter()
    lags: list[float] = [0.0] * len(plan)

    async def one(index: int, planned: PlannedRequest) -> RequestTiming:
        await asyncio.sleep(max(0.0, started + planned.at_s - time.perf_counter()))
        lags[index] = time.perf_counter() - (started + planned.at_s)
        return await send_or_record_failure(send, index, planned.max_tokens)

    timings = await asyncio.gather(*(one(i, planned) for i, planned in enumerate(plan)))
    return list(timings), time.perf_counter() - started, lags


def poisson_summary(timings: list[RequestTiming], wall_s: float, lags: list[float]) -> dict:
    done = [t for t in timings if t.error is None]
    short = [t for t in done if t.max_tokens is not None and t.max_tokens <= SHORT_TOKENS]
    tokens = sum(t.output_tokens for t in done)
    short_e2e = percentile([t.e2e_s for t in short], 95)
    return {
        "completed": len(done),
        "failed": len(timings) - len(done),
        # ignore_eos makes every length exact; a server that ignores the field stops early.
        "outputs short of max_tokens": sum(t.output_tokens < (t.max_tokens or 0) for t in done),
        "duration s": wall_s,
        "req/s": len(done) / wall_s,
        "out tok/s": tokens / wall_s,
        **latency_percentiles("TTFT", [t.ttft_s for t in done if t.ttft_s is not None]),
        **latency_percentiles("ITL", [gap for t in done for gap in t.itl_s]),
        **latency_percentiles("e2e", [t.e2e_s for t in done]),
        f"short requests (<= {SHORT_TOKENS} tokens)": len(short),
        f"short (<= {SHORT_TOKENS} tokens) e2e p95 ms": None if short_e2e is None else short_e2e * 1000,
        "client send lag max ms": max(lags, default=0.0) * 1000,
    }


async def measure_poisson(
    send: Send, *, requests: int, rate_per_s: float, output_lens: list[int], seed: int
) -> Measured:
    """One untimed warm-up request (prompt ``requests``), then the schedule on prompts 0..requests-1."""
    await send(requests, min(output_lens))
    plan = poisson_plan(requests, rate_per_s=rate_per_s, choices=output_lens, seed=seed)
    timings, wall_s, lags = await run_open_loop(send, plan)
    origin = min(t.sent_at for t in timings)
    records = [
        {**t.record(origin), "planned_at_s": planned.at_s, "send_lag_s": lag}
        for t, planned, lag in zip(timings, plan, lags, strict=True)
    ]
    return Measured(poisson_summary(timings, wall_s, lags), records)
