"""Two workloads about one image, where the first request brings a new image and the later ones do
not, so a server that keeps what it computed for the image (its vision-tower output, the prompt's KV
cache) answers them sooner:

* ``conversation``: a multi-turn chat, as chat UIs and screenshot agents send it: turn 1 asks about
  the image; each later turn re-sends the whole history (the image, the earlier questions, the model's
  earlier answers as assistant messages) plus a new question;
* ``image-repeat``: the same image asked different questions one after another, each a fresh
  single-turn chat.

Each round (``--repeats``) has an image of its own, and so has each run (a run tag seeds it), so a
server's cache from an earlier run cannot serve a "new" image; ``--reuse-inputs`` sends the plain
``--image`` every time instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from bench.chat import ChatImage, ChatSend, Message, Reply, send_or_record_failure
from bench.report import percentile
from bench.runs import Measured
from bench.workload import run_image

QUESTIONS = (
    "What is in this image?",
    "Which colours stand out, and where?",
    "Is there any text in it? Quote it.",
    "What is in the top left corner?",
    "How many distinct objects can you count?",
    "What would you crop to focus on the main subject?",
    "Describe the lighting and the mood.",
    "Summarise everything you said so far in one sentence.",
)
WARM_UP_TOKENS = 8


def question(index: int) -> str:
    """The ``index``-th question (from 0), all different however many are asked."""
    text = QUESTIONS[index % len(QUESTIONS)]
    return text if index < len(QUESTIONS) else f"{text} (question {index + 1})"


def turn_messages(image: ChatImage, answers: Sequence[str]) -> list[Message]:
    """Turn ``len(answers) + 1``'s messages: the image with question 1, then each earlier answer as an
    assistant message followed by the next question."""
    messages = [Message("user", question(0), image)]
    for index, answer in enumerate(answers, start=1):
        messages += [Message("assistant", answer), Message("user", question(index))]
    return messages


async def run_conversation(send: ChatSend, image: ChatImage, *, turns: int, max_tokens: int) -> list[Reply]:
    """One conversation; it ends at a failed turn (the next one would need its answer)."""
    replies: list[Reply] = []
    for _ in range(turns):
        reply = await send_or_record_failure(send, turn_messages(image, [r.text for r in replies]), max_tokens)
        replies.append(reply)
        if reply.timing.error is not None:
            break
    return replies


async def run_image_repeat(send: ChatSend, image: ChatImage, *, questions: int, max_tokens: int) -> list[Reply]:
    return [
        await send_or_record_failure(send, [Message("user", question(index), image)], max_tokens)
        for index in range(questions)
    ]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def first_and_repeats_summary(rounds: list[list[Reply]], *, first: str, repeats: str, planned: int) -> dict:
    """The figures of ``rounds`` (each a list of replies, the first one with a new image): the first
    request's TTFT (the median over rounds), the later ones' TTFT p50 and mean, e2e, prompt lengths."""
    firsts = [replies[0].timing for replies in rounds if replies[0].timing.error is None]
    later = [r.timing for replies in rounds for r in replies[1:] if r.timing.error is None]
    first_ttft = [t.ttft_s for t in firsts if t.ttft_s is not None]
    later_ttft = [t.ttft_s for t in later if t.ttft_s is not None]
    every = firsts + later
    repeat_p50 = percentile(later_ttft, 50)
    first_median = statistics.median(first_ttft) if first_ttft else None
    last = rounds[-1]
    return {
        "rounds": len(rounds),
        "completed": len(every),
        "failed": sum(r.timing.error is not None for replies in rounds for r in replies),
        "not sent (after a failed turn)": planned * len(rounds) - sum(len(replies) for replies in rounds),
        "outputs short of max_tokens": sum(t.output_tokens < (t.max_tokens or 0) for t in every),
        f"{first} TTFT ms": _ms(first_median),
        f"{repeats} TTFT p50 ms": _ms(repeat_p50),
        f"{repeats} TTFT mean ms": _ms(_mean(later_ttft)),
        f"{repeats} TTFT p50 / {first}": None if repeat_p50 is None or not first_median else repeat_p50 / first_median,
        f"{first} e2e ms": _ms(statistics.median([t.e2e_s for t in firsts]) if firsts else None),
        f"{repeats} e2e p50 ms": _ms(percentile([t.e2e_s for t in later], 50)),
        "round duration s": statistics.median(
            [max(r.timing.done_at for r in replies) - replies[0].timing.sent_at for replies in rounds]
        ),
        f"prompt tokens, {first}": last[0].prompt_tokens,
        "prompt tokens, last": last[-1].prompt_tokens,
    }


async def measure_image_chats(
    send: ChatSend,
    *,
    workload: str,
    image_option: str,
    seed: int,
    reuse: bool,
    count: int,
    max_tokens: int,
    rounds: int,
) -> Measured:
    """``workload`` ("conversation": ``count`` turns; "image-repeat": ``count`` questions) ``rounds``
    times, each round on an image of its own, after one untimed warm-up request on another."""
    tag = "" if reuse else f"{time.time_ns():x}"

    def image(name: str) -> ChatImage:
        return ChatImage(run_image(image_option, seed=seed, tag=tag and f"{tag}-{name}"))

    # The first request of a fresh engine pays one-off costs; an image of its own keeps round 1's new.
    await send([Message("user", "Describe this image.", image("warm-up"))], min(WARM_UP_TOKENS, max_tokens))
    results: list[list[Reply]] = []
    for round_index in range(rounds):
        picture = image(f"round-{round_index}")
        if workload == "conversation":
            results.append(await run_conversation(send, picture, turns=count, max_tokens=max_tokens))
        else:
            results.append(await run_image_repeat(send, picture, questions=count, max_tokens=max_tokens))
    names = {"conversation": ("turn 1", "turns 2+"), "image-repeat": ("question 1", "questions 2+")}[workload]
    summary = first_and_repeats_summary(results, first=names[0], repeats=names[1], planned=count)
    origin = min(replies[0].timing.sent_at for replies in results)
    records = [
        {
            "round": round_index + 1,
            "turn" if workload == "conversation" else "question": index + 1,
            "prompt_tokens": reply.prompt_tokens,
            **reply.timing.record(origin),
        }
        for round_index, replies in enumerate(results)
        for index, reply in enumerate(replies)
    ]
    return Measured(summary, records)
