"""The ``video`` workload: several clients asking about one short clip, as viewers of the same video
chat about it. Each client sends ``questions`` different questions one after another, each a fresh
single-turn chat that carries the whole clip again (as a ``video_url`` data: URI, with the sampling
``fps`` on the part), greedy, ``ignore_eos``, a fixed ``max_tokens``. Every client's first question
brings a video the server has not seen (all of them at once); the later ones send it again, so a
server that keeps what it computed for a video (its decoded frames, vision-tower output, the
prompt's KV blocks) answers them sooner. Reported: TTFT of the first questions and of the later ones
(p50, p95), e2e, and the aggregate output tok/s.

The clip is made here (``clip.py``). Each round (``--repeats``) has a clip of its own, and so has each
run (a run tag seeds it), so a server's caches from an earlier run cannot serve a "new" video;
``--reuse-inputs`` sends the clip of ``--seed`` every time instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from dataclasses import dataclass

from bench.chat import ChatSend, ChatVideo, Message, Reply, send_or_record_failure
from bench.clip import ClipSpec, make_clip
from bench.report import RequestTiming, percentile
from bench.runs import Measured

QUESTIONS = (
    "What happens in this video?",
    "Which way does the square move, and how fast?",
    "What colours does the square take as the clip plays?",
    "What does the white ball do?",
    "Describe the background.",
    "What changes between the first and the last second?",
    "How many moving objects are there?",
    "Summarise the clip in one sentence.",
)
WARM_UP_TOKENS = 8


def video_question(client: int, index: int, per_client: int) -> str:
    """Client ``client``'s ``index``-th question (both from 0): all different across clients, so only
    the video (not the question) is what the requests share."""
    number = client * per_client + index
    text = QUESTIONS[number % len(QUESTIONS)]
    return text if number < len(QUESTIONS) else f"{text} (question {number + 1})"


@dataclass
class VideoRound:
    """One round: each client's replies in order (question 1 first), and the round's wall time."""

    clients: list[list[Reply]]
    wall_s: float


async def run_client(send: ChatSend, video: ChatVideo, client: int, *, questions: int, max_tokens: int) -> list[Reply]:
    """One client's questions, each sent when the last one ended; a failed question is counted and
    the client goes on (each question is a chat of its own)."""
    return [
        await send_or_record_failure(
            send, [Message("user", video_question(client, index, questions), video=video)], max_tokens
        )
        for index in range(questions)
    ]


async def run_video_round(
    send: ChatSend, video: ChatVideo, *, clients: int, questions: int, max_tokens: int
) -> VideoRound:
    started = time.perf_counter()
    replies = await asyncio.gather(
        *(run_client(send, video, c, questions=questions, max_tokens=max_tokens) for c in range(clients))
    )
    return VideoRound(list(replies), time.perf_counter() - started)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def video_summary(rounds: list[VideoRound], *, clip_bytes: float) -> dict:
    """The figures of ``rounds``: TTFT of every client's first question (a new video) and of its later
    ones, p50 and p95 over all clients and rounds; e2e; output tok/s over the rounds' wall time."""
    every = [r.timing for rnd in rounds for replies in rnd.clients for r in replies]
    done = [t for t in every if t.error is None]
    firsts = [replies[0].timing for rnd in rounds for replies in rnd.clients if replies[0].timing.error is None]
    later = [r.timing for rnd in rounds for replies in rnd.clients for r in replies[1:] if r.timing.error is None]

    def ttft(timings: list[RequestTiming]) -> list[float]:
        return [t.ttft_s for t in timings if t.ttft_s is not None]

    first_p50, later_p50 = percentile(ttft(firsts), 50), percentile(ttft(later), 50)
    first_prompts = [replies[0].prompt_tokens for replies in rounds[-1].clients if replies[0].timing.error is None]
    wall_s = sum(rnd.wall_s for rnd in rounds)
    return {
        "rounds": len(rounds),
        "clients": len(rounds[0].clients),
        "completed": len(done),
        "failed": len(every) - len(done),
        "outputs short of max_tokens": sum(t.output_tokens < (t.max_tokens or 0) for t in done),
        "question 1 TTFT p50 ms": _ms(first_p50),
        "question 1 TTFT p95 ms": _ms(percentile(ttft(firsts), 95)),
        "questions 2+ TTFT p50 ms": _ms(later_p50),
        "questions 2+ TTFT p95 ms": _ms(percentile(ttft(later), 95)),
        "questions 2+ TTFT p50 / question 1": None if later_p50 is None or not first_p50 else later_p50 / first_p50,
        "question 1 e2e p50 ms": _ms(percentile([t.e2e_s for t in firsts], 50)),
        "questions 2+ e2e p50 ms": _ms(percentile([t.e2e_s for t in later], 50)),
        "e2e p95 ms": _ms(percentile([t.e2e_s for t in done], 95)),
        "aggregate out tok/s": sum(t.output_tokens for t in done) / wall_s if wall_s > 0 else None,
        "round duration s": statistics.median(rnd.wall_s for rnd in rounds),
        "prompt tokens, question 1": first_prompts[0] if first_prompts else None,  # the server's count: mostly the clip
        "clip KB": clip_bytes / 1024,
    }


async def measure_video(
    send: ChatSend,
    *,
    spec: ClipSpec,
    sample_fps: float,
    seed: int,
    reuse: bool,
    clients: int,
    questions: int,
    max_tokens: int,
    rounds: int,
) -> Measured:
    """``rounds`` rounds of ``clients`` clients asking ``questions`` questions each, every round about a
    clip of its own, after one untimed warm-up request about another."""
    tag = "" if reuse else f"{time.time_ns():x}"

    def video(name: str) -> ChatVideo:
        digest = hashlib.sha256(f"{seed}:{tag}-{name}".encode()).digest()
        clip = make_clip(spec, seed=int.from_bytes(digest[:8], "little") if tag else seed)
        return ChatVideo(clip, sample_fps)

    # The first request of a fresh engine pays one-off costs; a clip of its own keeps round 1's new.
    warm_up = video("warm-up")
    await send([Message("user", "Describe this video.", video=warm_up)], min(WARM_UP_TOKENS, max_tokens))
    results: list[VideoRound] = []
    clip_bytes = []
    for round_index in range(rounds):
        clip = video(f"round-{round_index}")
        clip_bytes.append(len(clip.clip.data))
        results.append(await run_video_round(send, clip, clients=clients, questions=questions, max_tokens=max_tokens))
    summary = video_summary(results, clip_bytes=statistics.median(clip_bytes))
    origin = min(r.timing.sent_at for rnd in results for replies in rnd.clients for r in replies)
    records = [
        {
            "round": round_index + 1,
            "client": client + 1,
            "question": index + 1,
            "prompt_tokens": reply.prompt_tokens,
            **reply.timing.record(origin),
        }
        for round_index, rnd in enumerate(results)
        for client, replies in enumerate(rnd.clients)
        for index, reply in enumerate(replies)
    ]
    return Measured(summary, records)
