"""Spoken replies over HTTP, shared by the form routes, chat audio and ``/v1/audio/speech``.

    voice = await open_voice(state, name, speed)              # 400 / 501 now, before any 200
    pieces = speak_answer(state, generation, voice)           # or speak_text(state, sentences, voice)
    StreamingResponse(audio_stream(pieces, ...), media_type=MEDIA_TYPES[fmt], headers=voice.response_headers(fmt))

A streamed WAV starts with the unknown-length header (sizes 0xFFFFFFFF): the length is not known
when the first sentence goes out. ``complete_audio`` waits for the whole answer instead and sends a
WAV whose header has the exact sizes, for tools that trust the header. The audio formats every route
sends (wav, pcm) and OpenAI's PCM rate live here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

from snark.api.state import AppState
from snark.api.streaming import STREAM_HEADERS, text_deltas
from snark.engine.request import GenerationRequest
from snark.speech import LazySpeaker, SpokenPiece, speak_deltas, speak_sentences
from snark.speech.resample import resample_pcm16
from snark.speech.wav import pcm_to_wav, silence, wav_header

log = logging.getLogger(__name__)


AudioFormat = Literal["wav", "pcm"]
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
PCM_SAMPLE_RATE = 24_000  # OpenAI's "pcm" / "pcm16" is 24 kHz 16-bit mono little-endian; its clients assume it


def audio_format_of(name: str) -> AudioFormat:
    """The body a request's format name asks for: raw PCM for pcm (the forms, speech) and pcm16
    (chat), else WAV. Request models have already refused the names Snark does not write."""
    return "pcm" if name in ("pcm", "pcm16") else "wav"


@dataclass(frozen=True)
class Voice:
    speaker: LazySpeaker
    sample_rate: int  # the voice's own rate; WAV is sent at it, PCM at PCM_SAMPLE_RATE
    speed: float

    def output_rate(self, audio_format: AudioFormat) -> int:
        return PCM_SAMPLE_RATE if audio_format == "pcm" else self.sample_rate

    def response_headers(self, audio_format: AudioFormat) -> dict[str, str]:
        """An audio body's headers: no proxy buffering, and the sample rate of its PCM."""
        return {**STREAM_HEADERS, "X-Sample-Rate": str(self.output_rate(audio_format))}


async def open_voice(state: AppState, name: str | None, speed: float = 1.0) -> Voice:
    """The voice ``name`` picks, loaded: an unknown name is a 400 and a missing voice file a 501
    here, before the route has started a 200. ``speed`` was checked by the request model."""
    speaker = state.voices.pick(name)
    rate = await asyncio.to_thread(lambda: speaker.sample_rate)  # loads the voice on first use
    return Voice(speaker, rate, speed)


def speak_answer(state: AppState, generation: GenerationRequest, voice: Voice) -> AsyncIterator[SpokenPiece]:
    """Transcript and audio of a submitted generation, spoken sentence by sentence as it is written."""
    deltas = text_deltas(state.engine.follow(generation), state.settings.request_timeout_s)
    return speak_deltas(deltas, _speak_with(state, voice), bytes_per_second=2 * voice.sample_rate)


def speak_text(state: AppState, sentences: list[str], voice: Voice) -> AsyncIterator[SpokenPiece]:
    """Audio of a whole text (``/v1/audio/speech``), given as the clean sentences it is spoken as
    (``speakable_sentences``), through the same pool and pipeline."""
    return speak_sentences(sentences, _speak_with(state, voice), bytes_per_second=2 * voice.sample_rate)


def _speak_with(state: AppState, voice: Voice) -> Callable[..., Awaitable[bytes]]:
    """``speak(sentence, due_at=...)`` in this voice, at its speed, through the shared synthesis pool."""
    return partial(state.voices.pool.speak, voice.speaker, speed=voice.speed)


class AudioTimer:
    """Observes a spoken reply in /metrics: time to its first audio byte and its total synthesis time."""

    def __init__(self, state: AppState) -> None:
        self.metrics = state.metrics
        self.arrived_at = time.perf_counter()
        self.first_audio_at: float | None = None

    def audio_sent(self) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
            self.metrics.time_to_first_audio.observe(self.first_audio_at - self.arrived_at)

    def finished(self) -> None:
        self.metrics.tts_seconds.observe(time.perf_counter() - self.arrived_at)


async def pcm_chunks(
    pieces: AsyncIterator[SpokenPiece], voice: Voice, audio_format: AudioFormat
) -> AsyncIterator[bytes]:
    """The audio of ``pieces`` at the format's rate; a short silence when there was nothing to say."""
    spoke = False
    async for piece in pieces:
        if piece.pcm:
            spoke = True
            yield resample_pcm16(piece.pcm, voice.sample_rate, voice.output_rate(audio_format))
    if not spoke:
        yield silence(voice.output_rate(audio_format))


async def audio_stream(
    pieces: AsyncIterator[SpokenPiece], voice: Voice, audio_format: AudioFormat, timer: AudioTimer
) -> AsyncIterator[bytes]:
    """A streamed body: for WAV the unknown-length header, then PCM sentence by sentence.

    Once the 200 is out a failure can only end the body: it is logged and the stream ends where the
    audio stopped (a player then simply stops), instead of an unexplained reset."""
    if audio_format == "wav":
        yield wav_header(voice.sample_rate)
    try:
        async for chunk in pcm_chunks(pieces, voice, audio_format):
            timer.audio_sent()
            yield chunk
        timer.finished()
    except Exception as exc:
        message = getattr(exc, "message", None)
        if message is None:
            log.exception("spoken reply failed after its first bytes; the audio ends here")
        else:
            log.warning("spoken reply ended early: %s", message)


async def complete_audio(
    pieces: AsyncIterator[SpokenPiece], voice: Voice, audio_format: AudioFormat, timer: AudioTimer
) -> bytes:
    """The whole reply as one body: a WAV with exact sizes in its header, or all the PCM."""
    pcm = b"".join([chunk async for chunk in pcm_chunks(pieces, voice, audio_format)])
    timer.audio_sent()
    timer.finished()
    return pcm_to_wav(pcm, voice.sample_rate) if audio_format == "wav" else pcm
