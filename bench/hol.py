"""The head-of-line workload (``--workload hol``): a few long requests start together, then a short
one arrives while they run. Its latency over its latency on the idle server says how long a server
makes a newcomer wait behind work already running: near 1 when it joins the running batch, up to
the long requests' whole length when it waits for them to finish.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.report import RequestTiming, percentile
from bench.runners import Send, send_or_record_failure
from bench.runs import Measured

IDLE_RUNS = 3  # the idle figure is the median of a few runs: one run of a few tokens is noisy


def prompts_needed(long_requests: int) -> int:
    return 1 + IDLE_RUNS + long_requests + 1  # warm-up, idle runs, long ones, the short one


async def run_head_of_line(
    send: Send, *, long_requests: int, long_tokens: int, short_tokens: int, delay_s: float
) -> tuple[list[RequestTiming], list[RequestTiming], RequestTiming]:
    """Returns (idle short runs, long requests, the short request sent among them). Prompts: 0 warms
    up, then one per request, so no two requests share a prompt (a prefix cache helps none)."""
    await send(0, short_tokens)  # untimed warm-up
    idle = [await send_or_record_failure(send, 1 + i, short_tokens) for i in range(IDLE_RUNS)]
    first_long = 1 + IDLE_RUNS
    started = time.perf_counter()
    longs = [
        asyncio.create_task(send_or_record_failure(send, first_long + i, long_tokens)) for i in range(long_requests)
    ]
    await asyncio.sleep(max(0.0, started + delay_s - time.perf_counter()))
    short = await send_or_record_failure(send, first_long + long_requests, short_tokens)
    return idle, list(await asyncio.gather(*longs)), short


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def hol_summary(idle: list[RequestTiming], longs: list[RequestTiming], short: RequestTiming) -> dict:
    idle_ok = [t for t in idle if t.error is None]
    idle_e2e = _median([t.e2e_s for t in idle_ok])
    idle_ttft = _median([t.ttft_s for t in idle_ok if t.ttft_s is not None])
    short_e2e = None if short.error else short.e2e_s
    longs_ok = [t for t in longs if t.error is None]
    return {
        "idle short e2e ms": _ms(idle_e2e),
        "idle short TTFT ms": _ms(idle_ttft),
        "short e2e under load ms": _ms(short_e2e),
        "short TTFT under load ms": _ms(short.ttft_s),
        "short e2e under load / idle": _ratio(short_e2e, idle_e2e),
        "short TTFT under load / idle": _ratio(short.ttft_s, idle_ttft),
        # 0 means the long requests were over before the short one came: no head of line was tested.
        "long requests running when the short was sent": sum(t.done_at > short.sent_at for t in longs_ok),
        "long e2e p50 ms": _ms(percentile([t.e2e_s for t in longs_ok], 50)),
        "failed": sum(t.error is not None for t in [*idle, *longs, short]),
    }


async def measure_hol(
    send: Send, *, long_requests: int, long_tokens: int, short_tokens: int, delay_s: float
) -> Measured:
    idle, longs, short = await run_head_of_line(
        send, long_requests=long_requests, long_tokens=long_tokens, short_tokens=short_tokens, delay_s=delay_s
    )
    origin = min(t.sent_at for t in [*idle, *longs, short])
    records = (
        [{"role": "idle short", **t.record(origin)} for t in idle]
        + [{"role": "long", **t.record(origin)} for t in longs]
        + [{"role": "short under load", **short.record(origin)}]
    )
    return Measured(hol_summary(idle, longs, short), records)
