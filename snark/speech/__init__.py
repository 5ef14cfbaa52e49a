"""Text-to-speech behind one small protocol (``Speaker``); engines are imported only when loaded.

    speaker = build_speaker(settings)          # nothing loaded yet
    wav = await speak_wav(speaker, "Hello.")   # complete WAV file
    async for chunk in stream_wav(speaker, answer, speed=1.25): ...   # header, then PCM per sentence
"""

from snark.speech.base import MAX_SPEED, MIN_SPEED, Speaker, SpeechUnavailable, validate_speed
from snark.speech.lazy import LazySpeaker, build_speaker, speak_wav, stream_pcm, stream_wav
from snark.speech.text import clean_for_speech, split_sentences
from snark.speech.wav import WAV_HEADER_BYTES, pcm_to_wav, wav_header

__all__ = [
    "MAX_SPEED",
    "MIN_SPEED",
    "WAV_HEADER_BYTES",
    "LazySpeaker",
    "Speaker",
    "SpeechUnavailable",
    "build_speaker",
    "clean_for_speech",
    "pcm_to_wav",
    "speak_wav",
    "split_sentences",
    "stream_pcm",
    "stream_wav",
    "validate_speed",
    "wav_header",
]
