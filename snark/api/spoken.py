"""Spoken replies over HTTP, shared by the form routes, chat audio and ``/v1/audio/speech``.

    voice = await open_voice(state, name)                       # 400 / 501 now, before any 200
    pieces = speak_answer(state, generation, voice, speed)      # or speak_text(state, text, ...)
    StreamingResponse(audio_stream(pieces, ...))                # WAV header + PCM, or raw PCM

A streamed WAV starts with the unknown-length header (sizes 0xFFFFFFFF): the length is not known
when the first sentence goes out. ``complete_audio`` waits for the whole answer instead and sends a
WAV whose header has the exact sizes, for tools that trust the header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from snark.api.cancellation import within
from snark.api.protocol import PCM_SAMPLE_RATE  # OpenAI's pcm / pcm16: 24 kHz, which its clients assume
from snark.api.replies import finish_reason_of
from snark.api.state import AppState
from snark.engine.request import GenerationRequest, StreamEvent
from snark.speech import LazySpeaker, SpokenPiece, single_text, speak_deltas, validate_speed
from snark.speech.resample import resample_pcm16
from snark.speech.wav import pcm_to_wav, silence, wav_header

log = logging.getLogger(__name__)


AudioFormat = Literal["wav", "pcm"]
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
# Proxies (nginx) buffer responses by default; audio streams must reach the client as written.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Voice:
    speaker: LazySpeaker
    sample_rate: int  # the voice's own rate; WAV is sent at it, PCM at PCM_SAMPLE_RATE
    speed: float

    def output_rate(self, audio_format: AudioFormat) -> int:
        return PCM_SAMPLE_RATE if audio_format == "pcm" else self.sample_rate


async def open_voice(state: AppState, name: str | None, speed: float = 1.0) -> Voice:
    """The voice ``name`` picks, loaded: an unknown name or bad speed is a 400 and a missing voice
    file a 501 here, before the route has started a 200."""
    validate_speed(speed)
    speaker = state.voices.pick(name)
    rate = await asyncio.to_thread(lambda: speaker.sample_rate)  # loads the voice on first use
    return Voice(speaker, rate, speed)


async def answer_deltas(events: AsyncIterator[StreamEvent], timeout_s: float) -> AsyncIterator[str]:
    """The answer's text deltas; a row the engine stopped on its own (shutdown) raises."""
    async for event in within(events, timeout_s):
        if event.text:
            yield event.text
        if event.finish_reason is not None:
            finish_reason_of(event.finish_reason)


def speak_answer(state: AppState, generation: GenerationRequest, voice: Voice) -> AsyncIterator[SpokenPiece]:
    """Transcript and audio of a submitted generation, spoken sentence by sentence as it is written."""
    deltas = answer_deltas(state.engine.follow(generation), state.settings.request_timeout_s)
    return _spoken(state, deltas, voice)


def speak_text(state: AppState, text: str, voice: Voice) -> AsyncIterator[SpokenPiece]:
    """Audio of a whole ``text`` (``/v1/audio/speech``), through the same pool and pipeline."""
    return _spoken(state, single_text(text), voice)


def _spoken(state: AppState, deltas: AsyncIterator[str], voice: Voice) -> AsyncIterator[SpokenPiece]:
    speak = partial(state.voices.pool.speak, voice.speaker, speed=voice.speed)
    return speak_deltas(deltas, speak, bytes_per_second=2 * voice.sample_rate)


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
