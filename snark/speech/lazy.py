"""Load the speech engine on first use.

Start-up stays fast and a server whose clients never ask for audio never loads a voice. Synthesis
itself runs in the synthesis pool (``pool.py``), never on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from snark.speech.base import Speaker, validate_speed

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

    def synthesize(self, sentence: str, *, speed: float = 1.0) -> Iterator[bytes]:
        validate_speed(speed)  # a bad speed should not cost a model load
        return self.load().synthesize(sentence, speed=speed)


def build_speaker(settings: Settings) -> LazySpeaker:
    """The configured engine, unloaded. Engine modules are imported inside the factory, so a missing
    optional package only matters once speech is actually used."""
    if settings.tts_engine == "coqui":
        model_name = settings.coqui_model

        def load_coqui() -> Speaker:
            from snark.speech.coqui_engine import CoquiSpeaker

            return CoquiSpeaker(model_name)

        return LazySpeaker(load_coqui, engine_name="coqui")

    voice_path, threads = settings.tts_voice, settings.tts_threads

    def load_piper() -> Speaker:
        from snark.speech.piper_engine import PiperSpeaker

        return PiperSpeaker(voice_path, threads=threads)

    return LazySpeaker(load_piper, engine_name="piper")
