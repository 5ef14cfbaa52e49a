"""Speak text while it is still being written: deltas in, transcript and audio pieces out.

    async for piece in speak_deltas(answer_deltas, partial(pool.speak, voice)):
        piece.text   # a transcript delta, as soon as it arrives
        piece.pcm    # one sentence of audio, in order, as soon as it is synthesized

Deltas go through ``SentenceSplitter``; each finished sentence, cleaned of markdown and emoji, is
handed to ``speak`` at once, so sentence 2 is synthesized while sentence 1 plays and the model is
still writing sentence 3. At most ``run_ahead`` sentences are synthesized or held ahead of the
consumer: a slow client costs bounded memory, and one that leaves costs at most that much
synthesis. Leaving the loop early cancels everything behind it, including ``deltas`` (whose own
cleanup stops the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from snark.speech.splitter import SentenceSplitter
from snark.speech.text import clean_for_speech

RUN_AHEAD_SENTENCES = 3


@dataclass(frozen=True)
class SpokenPiece:
    text: str = ""  # transcript delta (the answer's own text, markdown and all)
    pcm: bytes = b""  # 16-bit mono PCM of one sentence


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class _Playback:
    """When this reply's listener will need its next sentence: the first audio's time plus the
    length of the audio synthesized since."""

    def __init__(self, bytes_per_second: int) -> None:
        self.bytes_per_second = bytes_per_second
        self.first_audio_at: float | None = None
        self.synthesized_s = 0.0

    def started(self) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()

    def synthesized(self, job: asyncio.Future) -> None:
        if self.bytes_per_second and not job.cancelled() and job.exception() is None:
            self.synthesized_s += len(job.result()) / self.bytes_per_second

    def due_at(self) -> float | None:
        if self.first_audio_at is None or not self.bytes_per_second:
            return None
        return self.first_audio_at + self.synthesized_s


async def speak_deltas(
    deltas: AsyncIterator[str],
    speak: Callable[..., Awaitable[bytes]],
    *,
    bytes_per_second: int = 0,
    run_ahead: int = RUN_AHEAD_SENTENCES,
    splitter: SentenceSplitter | None = None,
) -> AsyncIterator[SpokenPiece]:
    """Transcript and audio pieces for the text ``deltas`` yield; see the module docstring.

    ``speak(sentence, due_at=...)`` synthesizes one sentence; ``due_at`` is when the listener will
    need it (None: now), known once audio has started: the first audio's time plus the seconds
    synthesized so far (``bytes_per_second`` of the PCM; 0 leaves every ``due_at`` None).
    """
    splitter = splitter or SentenceSplitter()
    playback = _Playback(bytes_per_second)
    slots = asyncio.Semaphore(run_ahead)
    # Text deltas and sentence jobs in the order they arose; the consumer awaits each job in turn.
    queue: asyncio.Queue[object] = asyncio.Queue()

    previous: list[asyncio.Future] = []  # this reply's latest job

    async def speak_in_turn(spoken: str, before: asyncio.Future | None) -> bytes:
        # One job of a reply in the pool at a time: its sentences are needed in order anyway, and a
        # reply never holds every worker, so another request always finds one soon.
        if before is not None:
            await asyncio.wait([before])
        return await speak(spoken, due_at=playback.due_at())

    async def submit(sentence: str) -> None:
        spoken = clean_for_speech(sentence)
        if spoken:
            await slots.acquire()  # bounded run-ahead: wait for the consumer to take a sentence
            job = asyncio.ensure_future(speak_in_turn(spoken, previous[-1] if previous else None))
            job.add_done_callback(playback.synthesized)
            previous[:] = [job]
            queue.put_nowait(job)

    async def read_deltas() -> None:
        try:
            async for delta in deltas:
                if delta:
                    queue.put_nowait(delta)
                    for sentence in splitter.feed(delta):
                        await submit(sentence)
            for sentence in splitter.flush():
                await submit(sentence)
            queue.put_nowait(_END)
        except Exception as exc:  # the consumer raises it in its own task, after the audio before it
            queue.put_nowait(_Failed(exc))

    reader = asyncio.create_task(read_deltas())
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, str):
                yield SpokenPiece(text=item)
            else:
                pcm = await item  # type: ignore[misc]
                slots.release()
                playback.started()
                yield SpokenPiece(pcm=pcm)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        while not queue.empty():  # sentences not yet spoken: drop the jobs no worker has started
            item = queue.get_nowait()
            if isinstance(item, asyncio.Future):
                item.cancel()
        with contextlib.suppress(Exception):
            await deltas.aclose()  # type: ignore[attr-defined]


async def single_text(text: str) -> AsyncIterator[str]:
    """A whole text as a one-delta stream, for requests that bring their text (``/v1/audio/speech``)."""
    yield text
