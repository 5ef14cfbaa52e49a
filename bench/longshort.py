"""The long-short workload (``--workload long-short``): one long prompt (a few thousand tokens of
text) asking for a long answer, then, a moment later, many short requests at once. A server that
prefills the long prompt in one go makes them all wait behind it; one that splits it into chunks
shared with the short requests' steps answers them sooner. Reported: the aggregate output tok/s over
the whole run, the short requests' e2e (p50, p95) and the long one's TTFT.

Every prompt's first line carries the run's tag (unless ``--reuse-inputs``), so a server's prefix
cache from an earlier run cannot serve it.
"""

from __future__ import annotations

import asyncio
import time

from bench.chat import ChatSend, Message, Reply, send_or_record_failure
from bench.report import RequestTiming, latency_percentiles
from bench.runs import Measured

WARM_UP_TOKENS = 8
SUBJECTS = (
    "the harbour crane",
    "a night train",
    "the old mill",
    "a glass bridge",
    "the river delta",
    "a wind farm",
    "the city library",
    "a mountain hut",
)
ACTIONS = ("was inspected by", "was painted by", "was photographed by", "was measured by")
PEOPLE = ("two engineers", "a careful student", "the night guard", "a visiting architect")
# Qwen2's tokenizer gives the notes below about this many tokens each (16 to 19: a word is one token,
# each digit of the note's number one more): measured on the note texts, checked by the tests.
TOKENS_PER_NOTE = 18


def note(index: int) -> str:
    subject = SUBJECTS[index % len(SUBJECTS)]
    action = ACTIONS[(index // len(SUBJECTS)) % len(ACTIONS)]
    person = PEOPLE[(index // 3) % len(PEOPLE)]
    return f"Note {index + 1}: {subject} {action} {person} in the morning."


def long_prompt(tokens: int, tag: str) -> str:
    """About ``tokens`` tokens of numbered notes, and a request to summarise them."""
    head = f"Run {tag}. " if tag else ""
    notes = "\n".join(note(i) for i in range(max(1, tokens // TOKENS_PER_NOTE)))
    return f"{head}Read these notes.\n{notes}\nSummarise the notes above, one paragraph per subject."


def short_prompt(index: int, tag: str) -> str:
    head = f"Run {tag}, request {index + 1}. " if tag else f"Request {index + 1}. "
    return head + "Describe a bicycle in detail, part by part."


async def run_long_short(
    send: ChatSend,
    *,
    tag: str,
    long_prompt_tokens: int,
    long_tokens: int,
    short_requests: int,
    short_tokens: int,
    delay_s: float,
) -> tuple[Reply, list[Reply], float]:
    """One untimed warm-up request, then the long request and, ``delay_s`` later, the short ones all
    at once. Returns the long reply, the short replies and the wall time from the long request's
    send to the last reply."""
    await send([Message("user", short_prompt(short_requests, tag))], min(WARM_UP_TOKENS, short_tokens))
    started = time.perf_counter()
    long = asyncio.create_task(
        send_or_record_failure(send, [Message("user", long_prompt(long_prompt_tokens, tag))], long_tokens)
    )
    await asyncio.sleep(max(0.0, started + delay_s - time.perf_counter()))
    shorts = await asyncio.gather(
        *(
            send_or_record_failure(send, [Message("user", short_prompt(i, tag))], short_tokens)
            for i in range(short_requests)
        )
    )
    long_reply = await long
    return long_reply, list(shorts), time.perf_counter() - started


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def long_short_summary(long: Reply, shorts: list[Reply], wall_s: float) -> dict:
    timings: list[RequestTiming] = [long.timing, *(r.timing for r in shorts)]
    done = [t for t in timings if t.error is None]
    short_done = [r.timing for r in shorts if r.timing.error is None]
    long_ok = long.timing.error is None
    e2e = latency_percentiles("short e2e", [t.e2e_s for t in short_done], (50, 95))
    ttft = latency_percentiles("short TTFT", [t.ttft_s for t in short_done if t.ttft_s is not None], (50, 95))
    return {
        "aggregate out tok/s": sum(t.output_tokens for t in done) / wall_s,
        "duration s": wall_s,
        "completed": len(done),
        "failed": len(timings) - len(done),
        "outputs short of max_tokens": sum(t.output_tokens < (t.max_tokens or 0) for t in done),
        **e2e,
        **ttft,
        "long TTFT ms": _ms(long.timing.ttft_s),
        "long e2e ms": _ms(long.timing.e2e_s) if long_ok else None,
        "long prompt tokens": long.prompt_tokens,
        # 0 means the long request was over before the short ones came: nothing was measured under it.
        "short requests sent while the long one ran": sum(t.sent_at < long.timing.done_at for t in short_done),
    }


async def measure_long_short(
    send: ChatSend,
    *,
    reuse: bool,
    long_prompt_tokens: int,
    long_tokens: int,
    short_requests: int,
    short_tokens: int,
    delay_s: float,
) -> Measured:
    tag = "" if reuse else f"{time.time_ns():x}"
    long, shorts, wall_s = await run_long_short(
        send,
        tag=tag,
        long_prompt_tokens=long_prompt_tokens,
        long_tokens=long_tokens,
        short_requests=short_requests,
        short_tokens=short_tokens,
        delay_s=delay_s,
    )
    origin = long.timing.sent_at
    records = [{"role": "long", "prompt_tokens": long.prompt_tokens, **long.timing.record(origin)}] + [
        {"role": "short", "prompt_tokens": r.prompt_tokens, **r.timing.record(origin)} for r in shorts
    ]
    return Measured(long_short_summary(long, shorts, wall_s), records)
