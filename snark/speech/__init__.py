"""Text-to-speech behind one small protocol (``Speaker``); engines are imported only when loaded.

speaker = build_speaker(settings)                      # nothing loaded yet
voices = build_voices(settings, speaker)               # named voices and the synthesis pool
async for piece in speak_deltas(deltas, partial(voices.pool.speak, speaker)):
    ...                                                # transcript deltas and PCM per sentence
speak_sentences(speakable_sentences(text), ...)        # a whole text: split and cleaned once, up front
"""

from snark.speech.base import MAX_SPEED, MIN_SPEED, Speaker, SpeechUnavailable, validate_speed
from snark.speech.lazy import LazySpeaker, build_speaker
from snark.speech.pool import SynthesisPool
from snark.speech.splitter import SentenceSplitter
from snark.speech.stream import SpokenPiece, single_text, speak_deltas, speak_sentences, speakable_sentences
from snark.speech.text import clean_for_speech, split_sentences
from snark.speech.voices import Voices, build_voices
from snark.speech.wav import WAV_HEADER_BYTES, pcm_to_wav, wav_header

__all__ = [
    "MAX_SPEED",
    "MIN_SPEED",
    "WAV_HEADER_BYTES",
    "LazySpeaker",
    "SentenceSplitter",
    "Speaker",
    "SpeechUnavailable",
    "SpokenPiece",
    "SynthesisPool",
    "Voices",
    "build_speaker",
    "build_voices",
    "clean_for_speech",
    "pcm_to_wav",
    "single_text",
    "speak_deltas",
    "speak_sentences",
    "speakable_sentences",
    "split_sentences",
    "validate_speed",
    "wav_header",
]
