"""Coqui TTS (the optional ``snark[coqui]`` extra): more voices and models, heavier than piper.

Only the missing-package path can be tested here; the rest follows coqui-tts's documented API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from snark.errors import InvalidRequest
from snark.speech.base import SpeechUnavailable, validate_speed
from snark.speech.wav import float_to_pcm16, silence

COQUI_INSTALL_HINT = (
    "Coqui TTS is not installed: `uv sync --extra coqui` (or pip install coqui-tts), or set SNARK_TTS_ENGINE=piper"
)


class CoquiSpeaker:
    """Implements ``Speaker`` with one Coqui model (downloaded by Coqui on first use)."""

    def __init__(self, model_name: str) -> None:
        try:
            from TTS.api import TTS
        except ImportError as exc:
            raise SpeechUnavailable(COQUI_INSTALL_HINT) from exc
        self._tts = TTS(model_name)
        # Coqui's Synthesizer runs torch modules and keeps per-call state; it is not documented as
        # thread-safe, so synthesis is serialised, one sentence at a time.
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return int(self._tts.synthesizer.output_sample_rate)

    def synthesize(self, sentence: str, *, speed: float = 1.0) -> Iterator[bytes]:
        # Checked now, not on the first next(): a bad speed must be a 400 before streaming starts.
        return self._generate(sentence, validate_speed(speed))

    def _generate(self, sentence: str, speed: float) -> Iterator[bytes]:
        # `speed` goes to the model's synthesize(); only some models (XTTS) take it, so it is passed
        # only when asked for, and a model that refuses it is a clear 400 rather than silently ignored.
        extra = {} if speed == 1.0 else {"speed": speed}
        samples = []
        if sentence.strip():  # nothing to say never reaches the model: it is a short silence
            with self._lock:
                try:
                    # One sentence, already split: Coqui's own splitter would only cut it again.
                    samples = self._tts.tts(text=sentence, split_sentences=False, **extra)
                except TypeError as exc:
                    if not extra:
                        raise
                    raise InvalidRequest(
                        "This Coqui model cannot change the speaking speed; use speed=1.0.",
                        param="speed",
                    ) from exc
        yield float_to_pcm16(samples) if len(samples) else silence(self.sample_rate)
