"""Chat with audio output, shaped as OpenAI's audio models answer, so its clients read it unchanged.

    {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
      -> message.audio = {"id", "data" (base64), "transcript", "expires_at"}, content null
    the same with "stream": true ("format": "pcm16", the one format OpenAI streams)
      -> delta.audio = {"transcript": ...} as the model writes, {"data": ...} as each sentence is
         spoken, and last {"id", "expires_at"}

A later turn may send the answer back as ``{"role": "assistant", "audio": {"id": ...}}``. The id
carries its own transcript (compressed), so any replica reads it back without keeping state, and
it never really expires; ``expires_at`` is still sent because clients expect the field.
"""

from __future__ import annotations

import base64
import binascii
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from snark.api.replies import ChatReply, sse_line
from snark.api.streaming import finish_reason_of
from snark.engine.request import GenerationRequest
from snark.errors import InvalidRequest
from snark.speech import SpokenPiece

_ID_PREFIX = "audio_"
AUDIO_TTL_S = 24 * 3600


def audio_id(transcript: str) -> str:
    packed = zlib.compress(transcript.encode("utf-8"), 9)
    return _ID_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")


def transcript_of(audio_id_: str, *, param: str) -> str:
    """The transcript an ``audio.id`` from this server carries; a 400 naming ``param`` otherwise."""
    body = audio_id_.removeprefix(_ID_PREFIX)
    try:
        packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return zlib.decompress(packed).decode("utf-8")
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(
            f"{param} is not an audio id from this server: send back message.audio.id as it came, "
            "or the assistant's text as content.",
            param=param,
        ) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def audio_message(transcript: str, data: bytes) -> dict:
    """``message.audio`` of a non-streamed completion: ``data`` is the whole file (WAV or PCM)."""
    return {
        "id": audio_id(transcript),
        "data": _b64(data),
        "expires_at": int(time.time()) + AUDIO_TTL_S,
        "transcript": transcript,
    }


def audio_completion(reply: ChatReply, done: GenerationRequest, transcript: str, data: bytes) -> dict:
    body = reply.completion(done)
    message = body["choices"][0]["message"]
    message["content"], message["audio"] = None, audio_message(transcript, data)
    return body


async def chat_audio_events(
    reply: ChatReply,
    generation: GenerationRequest,
    pieces: AsyncIterator[SpokenPiece],
    to_pcm16: Callable[[bytes], bytes],
    *,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """The SSE body of a streamed audio completion: transcript deltas as the model writes them, and
    base64 PCM (``to_pcm16`` turns the voice's PCM into OpenAI's 24 kHz) as each sentence is ready.
    Wrap it in ``replies.sse_stream`` for the error event and ``[DONE]``."""
    transcript: list[str] = []
    yield sse_line(
        reply.chunk({"role": "assistant", "content": None, "audio": {"transcript": ""}}, usage_field=include_usage)
    )
    async for piece in pieces:
        if piece.text:
            transcript.append(piece.text)
            yield sse_line(reply.chunk({"audio": {"transcript": piece.text}}, usage_field=include_usage))
        if piece.pcm:
            yield sse_line(reply.chunk({"audio": {"data": _b64(to_pcm16(piece.pcm))}}, usage_field=include_usage))
    ending = {"id": audio_id("".join(transcript)), "expires_at": int(time.time()) + AUDIO_TTL_S}
    yield sse_line(reply.chunk({"audio": ending}, usage_field=include_usage))
    yield sse_line(reply.chunk({}, finish_reason_of(generation.finish_reason), usage_field=include_usage))
    if include_usage:
        yield sse_line(reply.usage_chunk(generation.completion_tokens))
