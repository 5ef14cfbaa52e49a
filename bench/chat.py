"""Whole chats, as the chat workloads (``conversation``, ``image-repeat``, ``video``, ``long-short``)
send them: a list of messages (user text, an image or a video, earlier answers as assistant messages),
to an in-process engine or to any OpenAI-compatible server, with the answer's text coming back for the
next turn's history.

Every request is greedy, ``ignore_eos`` with a fixed ``max_tokens``, and streamed: over HTTP, SSE with
``stream_options.include_usage``, as the other workloads send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import httpx
from PIL import Image

from bench.clip import Clip
from bench.engine import Engine
from bench.report import RequestTiming
from bench.runners import REQUEST_TIMEOUT_S, HttpTarget, stream_chat
from snark.values import ChatTurn, SamplingParams
from snark.video.load import VideoLimits, VideoLoader


@dataclass(frozen=True, eq=False)
class ChatImage:
    """An image a chat shows, encoded once: requests are timed from before their body is built, and
    an encode per request would count as the server's time to first token."""

    image: Image.Image

    @cached_property
    def data_uri(self) -> str:
        buffer = io.BytesIO()
        self.image.save(buffer, format="JPEG", quality=90)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True, eq=False)
class ChatVideo:
    """A video a chat shows: an encoded clip, sent as a data: URI built when this is made (before any
    clock starts, in-process too), and the frames a second the server is asked to sample from it."""

    clip: Clip
    sample_fps: float
    data_uri: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        encoded = base64.b64encode(self.clip.data).decode()
        object.__setattr__(self, "data_uri", f"data:{self.clip.mime};base64,{encoded}")

    def part(self) -> dict:
        """The chat content part: vLLM's ``video_url`` shape, with Qwen's ``fps`` beside it (Snark reads
        it there; vLLM's server samples by its own ``--media-io-kwargs`` and ignores it)."""
        return {"type": "video_url", "video_url": {"url": self.data_uri}, "fps": self.sample_fps}


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    text: str
    image: ChatImage | None = None  # a user message's image, shown before its text
    video: ChatVideo | None = None  # a user message's video, shown before its text


@dataclass(frozen=True)
class Reply:
    text: str  # the answer, to go back into the history as an assistant message
    timing: RequestTiming
    prompt_tokens: int | None = None  # the server's usage figure; the engine's prompt length in-process


ChatSend = Callable[[Sequence[Message], int], Awaitable[Reply]]  # (messages, max_tokens) -> the reply


async def send_or_record_failure(send: ChatSend, messages: Sequence[Message], max_tokens: int) -> Reply:
    """``send``, with a failure kept as a reply whose timing says what went wrong."""
    started = time.perf_counter()
    try:
        return await send(messages, max_tokens)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, whatever the server or engine raised
        error = f"{type(exc).__name__}: {exc}"[:300]
        return Reply("", RequestTiming(started, None, time.perf_counter(), 0, max_tokens=max_tokens, error=error))


async def engine_turns(messages: Sequence[Message], videos: VideoLoader) -> list[ChatTurn]:
    """The engine's turns; a video decoded and sampled as the server does it (its loader keeps
    sampled clips, so a video sent again is not decoded again)."""
    turns = []
    for m in messages:
        parts: list = [m.image.image] if m.image is not None else []
        if m.video is not None:
            parts.append(await videos.url(m.video.data_uri, videos.caps.clamp(fps=m.video.sample_fps)))
        turns.append(ChatTurn(m.role, [*parts, m.text]))
    return turns


def openai_messages(messages: Sequence[Message]) -> list[dict]:
    """The chat as ``/v1/chat/completions`` takes it: a user message with an image or a video as
    content parts, the media before the text."""
    shaped = []
    for message in messages:
        if message.image is None and message.video is None:
            shaped.append({"role": message.role, "content": message.text})
            continue
        parts = [{"type": "image_url", "image_url": {"url": message.image.data_uri}}] if message.image else []
        parts += [message.video.part()] if message.video else []
        shaped.append({"role": message.role, "content": [*parts, {"type": "text", "text": message.text}]})
    return shaped


@contextlib.asynccontextmanager
async def engine_chat_sender(
    engine: Engine, pixels: tuple[int, int], videos: VideoLoader | None = None
) -> AsyncIterator[ChatSend]:
    """``videos``: the server's video limits and sampled-clip cache (default: the default settings')."""
    videos = videos or VideoLoader(VideoLimits())

    async def stream(messages: Sequence[Message], max_tokens: int) -> Reply:
        sent = time.perf_counter()  # from before the prompt is built: media are preprocessed per request
        turns = await engine_turns(messages, videos)
        prompt = await engine.build_prompt(turns, min_pixels=pixels[0], max_pixels=pixels[1])
        request = engine.submit(prompt, SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
        chunk_times = []
        async for event in engine.follow(request):  # cancels the row if this is left early (a timeout)
            if event.text:
                chunk_times.append(time.perf_counter())
        first = chunk_times[0] if chunk_times else None
        timing = RequestTiming(
            sent, first, time.perf_counter(), request.completion_tokens, chunk_times, max_tokens=max_tokens
        )
        return Reply(request.text, timing, prompt.num_tokens)

    async def send(messages: Sequence[Message], max_tokens: int) -> Reply:
        # The HTTP client's limit too: an engine whose worker died fails the run instead of hanging it.
        return await asyncio.wait_for(stream(messages, max_tokens), REQUEST_TIMEOUT_S)

    yield send


@contextlib.asynccontextmanager
async def http_chat_sender(target: HttpTarget) -> AsyncIterator[ChatSend]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:

        async def send(messages: Sequence[Message], max_tokens: int) -> Reply:
            body = {
                "model": target.model,
                "messages": openai_messages(messages),  # media encoded before the clock starts
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,  # vLLM's extension: fixed output lengths
            }
            sent = time.perf_counter()
            reader = await stream_chat(client, target.url, body)
            timing = RequestTiming(
                sent,
                reader.first_content_at,
                time.perf_counter(),
                reader.completion_tokens,
                reader.content_times,
                max_tokens=max_tokens,
            )
            return Reply(reader.text, timing, reader.usage_prompt_tokens)

        yield send
