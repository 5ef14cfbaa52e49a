"""Load the speech engine on first use, and bridge its blocking synthesis to asyncio.

Start-up stays fast and a server whose clients never ask for audio never loads a voice. The async
helpers run every blocking step (loading, each sentence) in a worker thread so the event loop keeps
serving other requests while a voice speaks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING

from snark.speech.base import Speaker, validate_speed
from snark.speech.wav import pcm_to_wav, wav_header

if TYPE_CHECKING:
    from snark.config import Settings


class LazySpeaker:
    """A ``Speaker`` that builds the real one with ``factory`` on first use, exactly once."""

    def __init__(self, factory: Callable[[], Speaker], *, engine_name: str = "speech") -> None:
        self._factory = factory
        self._engine: Speaker | None = None
        self._lock = threading.Lock()
        self.engine_name = engine_name
        self.load_seconds: float | None = None  # how long the factory took; None until loaded

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load(self) -> Speaker:
        """The engine, built now if needed. Call it at start-up to pay the load time early. A failed
        load (e.g. ``SpeechUnavailable``) is not cached: the next call tries again."""
        engine = self._engine
        if engine is not None:  # fast path without the lock once loaded
            return engine
        with self._lock:
            if self._engine is None:  # another thread may have loaded it while we waited
                started = time.perf_counter()
                self._engine = self._factory()
                self.load_seconds = time.perf_counter() - started
            return self._engine

    @property
    def sample_rate(self) -> int:
        return self.load().sample_rate

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        validate_speed(speed)  # a bad request should not cost a model load
        return self.load().synthesize(text, speed=speed)


def build_speaker(settings: Settings) -> LazySpeaker:
    """The configured engine, unloaded. Engine modules are imported inside the factory, so a missing
    optional package only matters once speech is actually used."""
    if settings.tts_engine == "coqui":
        model_name = settings.coqui_model

        def load_coqui() -> Speaker:
            from snark.speech.coqui_engine import CoquiSpeaker

            return CoquiSpeaker(model_name)

        return LazySpeaker(load_coqui, engine_name="coqui")

    voice_path = settings.tts_voice

    def load_piper() -> Speaker:
        from snark.speech.piper_engine import PiperSpeaker

        return PiperSpeaker(voice_path)

    return LazySpeaker(load_piper, engine_name="piper")


async def speak_wav(speaker: Speaker, text: str, speed: float = 1.0) -> bytes:
    """A complete WAV file for ``text``; loading and synthesis run in a worker thread."""
    validate_speed(speed)

    def synthesize_file() -> bytes:
        pcm = b"".join(speaker.synthesize(text, speed=speed))
        return pcm_to_wav(pcm, speaker.sample_rate)

    return await asyncio.to_thread(synthesize_file)


def stream_pcm(speaker: Speaker, text: str, speed: float = 1.0) -> AsyncGenerator[bytes, None]:
    """16-bit PCM chunks for ``text``, one sentence at a time, each synthesized in a worker thread.

    A plain function returning the async iterator so a bad ``speed`` raises ``InvalidRequest`` here,
    before a route has started its streaming response.
    """
    validate_speed(speed)
    return _pcm_chunks(speaker, text, speed)


def stream_wav(speaker: Speaker, text: str, speed: float = 1.0) -> AsyncGenerator[bytes, None]:
    """A streaming WAV: the 44-byte header with unknown sizes (``0xFFFFFFFF``), then PCM chunks."""
    validate_speed(speed)
    return _wav_chunks(speaker, text, speed)


async def _wav_chunks(speaker: Speaker, text: str, speed: float) -> AsyncGenerator[bytes, None]:
    sample_rate = await asyncio.to_thread(lambda: speaker.sample_rate)  # may load the engine
    yield wav_header(sample_rate)
    async for chunk in _pcm_chunks(speaker, text, speed):
        yield chunk


_DONE = object()


async def _pcm_chunks(speaker: Speaker, text: str, speed: float) -> AsyncGenerator[bytes, None]:
    # Even building the iterator may load the engine and clean the text, so it runs in a thread too.
    chunks = await asyncio.to_thread(lambda: iter(speaker.synthesize(text, speed=speed)))
    try:
        while (chunk := await asyncio.to_thread(next, chunks, _DONE)) is not _DONE:
            yield chunk  # type: ignore[misc]
    finally:
        # The client went away (or we finished): stop the engine's generator so no further sentence
        # is synthesized. If its worker thread is still inside a sentence, close() refuses with
        # ValueError; the generator is then dropped once that sentence ends.
        close = getattr(chunks, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:
                pass
