"""Speak text while it is still being written: deltas in, transcript and audio pieces out.

    async for piece in speak_deltas(deltas, partial(pool.speak, voice)):
        piece.text   # a transcript delta, as soon as it arrives
        piece.pcm    # one sentence of audio, in order, as soon as it is synthesized

This is where text is split into sentences and cleaned for speech, once: deltas go through
``SentenceSplitter``, and each finished sentence, cleaned of markdown and emoji, is handed to
``speak`` at once, so sentence 2 is synthesized while sentence 1 plays and the model is still
writing sentence 3. A text that arrives whole is split the same way by ``speakable_sentences`` and
spoken by ``speak_sentences``. At most ``run_ahead`` sentences are synthesized or held ahead of the
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

from snark.speech.splitter import SentenceSplitter, split_sentences
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


def speakable_sentences(text: str) -> list[str]:
    """A whole ``text`` as a voice speaks it: its sentences (at most 400 characters each), each
    cleaned of markdown and emoji; those with nothing to say are left out."""
    return _cleaned(split_sentences(text))


def _cleaned(sentences: list[str]) -> list[str]:
    # The splitter ends a sentence at every line break, so each cleans to one line or to nothing (an
    # emoji, a fence marker); splitlines() also parts the rarer breaks cleaning keeps apart (U+2028).
    return [line for sentence in sentences for line in clean_for_speech(sentence).splitlines()]


def speak_deltas(
    deltas: AsyncIterator[str],
    speak: Callable[..., Awaitable[bytes]],
    *,
    bytes_per_second: int = 0,
    run_ahead: int = RUN_AHEAD_SENTENCES,
    splitter: SentenceSplitter | None = None,
) -> AsyncIterator[SpokenPiece]:
    """Transcript and audio pieces for the text ``deltas`` yield; see the module docstring.

    ``speak(sentence, due_at=...)`` synthesizes one clean sentence; ``due_at`` is when the listener
    will need it (None: now), known once audio has started: the first audio's time plus the seconds
    synthesized so far (``bytes_per_second`` of the PCM; 0 leaves every ``due_at`` None).
    """
    written = _sentences_as_written(deltas, splitter or SentenceSplitter())
    return _speak(written, speak, bytes_per_second=bytes_per_second, run_ahead=run_ahead)


def speak_sentences(
    sentences: list[str],
    speak: Callable[..., Awaitable[bytes]],
    *,
    bytes_per_second: int = 0,
    run_ahead: int = RUN_AHEAD_SENTENCES,
) -> AsyncIterator[SpokenPiece]:
    """Audio pieces for ``sentences`` already split and cleaned (``speakable_sentences``), with the
    same run-ahead and scheduling as ``speak_deltas``; no transcript pieces."""
    return _speak(_given(sentences), speak, bytes_per_second=bytes_per_second, run_ahead=run_ahead)


async def _sentences_as_written(
    deltas: AsyncIterator[str], splitter: SentenceSplitter
) -> AsyncIterator[tuple[str, list[str]]]:
    """(delta, the clean sentences it completed) for each delta, then ("", the rest) at the end."""
    try:
        async for delta in deltas:
            if delta:
                yield delta, _cleaned(splitter.feed(delta))
        yield "", _cleaned(splitter.flush())
    finally:
        with contextlib.suppress(Exception):
            await deltas.aclose()  # type: ignore[attr-defined]


async def _given(sentences: list[str]) -> AsyncIterator[tuple[str, list[str]]]:
    yield "", sentences


async def _speak(
    written: AsyncIterator[tuple[str, list[str]]],
    speak: Callable[..., Awaitable[bytes]],
    *,
    bytes_per_second: int,
    run_ahead: int,
) -> AsyncIterator[SpokenPiece]:
    """Transcript deltas and the audio of each clean sentence, in the order ``written`` gives them."""
    playback = _Playback(bytes_per_second)
    slots = asyncio.Semaphore(run_ahead)
    # Text deltas and sentence jobs in the order they arose; the consumer awaits each job in turn.
    queue: asyncio.Queue[object] = asyncio.Queue()

    previous: list[asyncio.Future] = []  # this reply's latest job

    async def speak_in_turn(sentence: str, before: asyncio.Future | None) -> bytes:
        # One job of a reply in the pool at a time: its sentences are needed in order anyway, and a
        # reply never holds every worker, so another request always finds one soon.
        if before is not None:
            await asyncio.wait([before])
        return await speak(sentence, due_at=playback.due_at())

    async def submit(sentence: str) -> None:
        await slots.acquire()  # bounded run-ahead: wait for the consumer to take a sentence
        job = asyncio.ensure_future(speak_in_turn(sentence, previous[-1] if previous else None))
        job.add_done_callback(playback.synthesized)
        previous[:] = [job]
        queue.put_nowait(job)

    async def read_written() -> None:
        try:
            async for delta, sentences in written:
                if delta:
                    queue.put_nowait(delta)
                for sentence in sentences:
                    await submit(sentence)
            queue.put_nowait(_END)
        except Exception as exc:  # the consumer raises it in its own task, after the audio before it
            queue.put_nowait(_Failed(exc))

    reader = asyncio.create_task(read_written())
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
            await written.aclose()  # type: ignore[attr-defined]  # closes the deltas behind it


async def single_text(text: str) -> AsyncIterator[str]:
    """A whole text as a one-delta stream, spoken as if it were being written (transcript included)."""
    yield text
