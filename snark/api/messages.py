"""Chat messages as OpenAI sends them, and how they become ``ChatTurn``s: roles mapped, every
part checked (an image or video only in a user message, a tool call's arguments a JSON object), then
the images and videos fetched all at once. A malformed message is a 400 naming where it is, before
any download.

Videos come as ``{"type": "video_url", "video_url": {"url": ...}}`` (vLLM's part), or as Qwen's
``{"type": "video", "video": URL or [frame URLs]}``; how each is sampled (``VideoOptions``: fps,
frame counts, pixel bounds, a time range) may be given on the part, inside ``video_url``, or for
every video of the request in ``mm_processor_kwargs`` (vLLM's field), nearest first, and is held
within the server's caps. An image's size (``image_url.detail``, ``min_pixels`` / ``max_pixels``)
is given the same ways, nearest first, and held within the server's caps (``image_resolution``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import AliasChoices, Field

from snark.api.chat_audio import transcript_of
from snark.api.image_resolution import ImageResolution
from snark.api.lenient import Lenient
from snark.errors import InvalidRequest, SnarkError
from snark.values import ChatTurn, ImagePart, ToolCall
from snark.video.clip import Video
from snark.video.load import VideoLoader
from snark.video.sampling import VideoSampling

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


_MIN_PIXELS = "Least pixels of an image or of one video frame (held within the server's caps)."
_MAX_PIXELS = "Most pixels of an image or of one video frame (held within the server's caps)."


class ImageURL(Lenient):
    url: str = Field(description="http(s) URL or data:image/...;base64, URI")
    detail: Literal["auto", "low", "high"] | None = Field(
        None,
        description="low: at most SNARK_LOW_DETAIL_IMAGE_PIXELS (512 x 512 by default: fewer tokens); high and "
        "auto (the default): the server's SNARK_MIN/MAX_IMAGE_PIXELS. min_pixels/max_pixels win over it.",
    )
    min_pixels: int | None = Field(None, ge=28 * 28, description=_MIN_PIXELS)
    max_pixels: int | None = Field(None, ge=28 * 28, description=_MAX_PIXELS)


class VideoOptions(Lenient):
    """How to sample a video (Qwen's names; None: the server's default). Frames and pixels are held
    within the server's caps (SNARK_MAX_VIDEO_FRAMES, SNARK_MAX_VIDEO_FRAME_PIXELS, SNARK_MAX_VIDEO_TOKENS)."""

    fps: float | None = Field(
        None,
        gt=0,
        le=60,
        description="Frames sampled per second (default 2). For a list of frames: the rate they were taken at.",
    )
    nframes: int | None = Field(
        None,
        ge=2,
        validation_alias=AliasChoices("nframes", "num_frames"),
        description="A fixed frame count instead of fps (rounded to even).",
    )
    min_frames: int | None = Field(None, ge=2)
    max_frames: int | None = Field(None, ge=2)
    min_pixels: int | None = Field(None, ge=28 * 28, description=_MIN_PIXELS)
    max_pixels: int | None = Field(None, ge=28 * 28, description=_MAX_PIXELS)
    total_pixels: int | None = Field(None, ge=28 * 28, description="Most pixels of all frames (a pair counts once).")
    video_start: float | None = Field(None, ge=0, description="Start of the part to sample, seconds.")
    video_end: float | None = Field(None, gt=0, description="End of the part to sample, seconds.")

    def given(self) -> dict:
        """The sampling fields that were set (a part's other fields left out)."""
        return {name: getattr(self, name) for name in VideoOptions.model_fields if getattr(self, name) is not None}


def video_sampling(loader: VideoLoader, *layers: VideoOptions | None) -> VideoSampling:
    """The sampling of one video: ``layers`` (nearest first) over the server's defaults, within its caps."""
    fields: dict = {}
    for layer in reversed([layer for layer in layers if layer is not None]):
        fields.update(layer.given())
    start, end = fields.pop("video_start", None), fields.pop("video_end", None)
    if start is not None and end is not None and end <= start:
        raise InvalidRequest(f"video_end ({end}) must come after video_start ({start}).", param="video_end")
    return loader.caps.clamp(**fields, start_s=start, end_s=end)


class VideoURL(VideoOptions):
    url: str = Field(description="http(s) URL or data:video/...;base64, URI (MP4, WebM, MKV, MOV, AVI, ...)")


class ContentPart(VideoOptions):
    type: str = Field(
        description="'text', 'image_url', 'video_url', or 'video' (Qwen's: a URL or a list of frame URLs)",
        json_schema_extra={"enum": ["text", "image_url", "video_url", "video"]},
    )
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None
    video: str | list[str] | None = Field(None, description="type 'video': a video URL, or its frames as image URLs")


class CalledFunction(Lenient):
    name: str
    arguments: str = Field(description="The arguments as a JSON object in a string, as the model wrote them.")


class AssistantToolCall(Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class MessageAudio(Lenient):
    id: str = Field(description="message.audio.id of an earlier spoken answer: its transcript is the history.")


class ChatMessage(Lenient):
    role: str = Field(json_schema_extra={"enum": list(_ROLES)})  # checked in _parse_message, naming the message
    content: str | list[ContentPart] | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: which call this is the result of
    audio: MessageAudio | None = None


@dataclass
class _Media:
    """One image or video a request refers to, in order: where it is (for errors) and what to load."""

    param: str
    part: str  # the content part it came in: messages[0].content[1]
    kind: str  # "image" | "video" (a file) | "frames" (a video as image URLs)
    source: str | list[str]
    layers: tuple[VideoOptions, ...] = ()  # a video's sampling fields (an image's part: its bounds), nearest first
    sampling: VideoSampling | None = None  # set from them once the request is checked
    image_url: ImageURL | None = None  # an image's own detail and bounds (its part's come in ``layers``)
    bounds: tuple[int, int] | None = None  # an image's (min_pixels, max_pixels), set once the request is checked


async def messages_to_turns(
    messages: list[ChatMessage],
    load_image: Callable[[str], Awaitable[Image.Image]],
    *,
    max_images: int,
    videos: VideoLoader | None = None,
    video_options: VideoOptions | None = None,
    image_resolution: ImageResolution | None = None,
) -> list[ChatTurn]:
    """``messages`` -> chat turns, images fetched concurrently with ``load_image`` and videos with
    ``videos`` (None: this caller takes none); ``video_options`` applies to every video, and its pixel
    bounds to every image. With ``image_resolution``, each image comes with the bounds its fields ask
    for, within those caps (``ImagePart``); without, bare, at the bounds the prompt is built with."""
    media: list[_Media] = []
    layout = [_parse_message(i, message, media) for i, message in enumerate(messages)]
    _check_counts(media, max_images, videos, video_options)
    if image_resolution is not None:
        for item in media:
            if item.kind == "image":
                detail = item.image_url.detail if item.image_url is not None else None
                item.bounds = image_resolution.bounds(detail, item.image_url, *item.layers, video_options)
    loaded = await _load_all(media, load_image, videos)
    return [
        ChatTurn(role, [loaded[p] if isinstance(p, int) else p for p in parts], tool_calls=calls)
        for role, parts, calls in layout
    ]


def _check_counts(
    media: list[_Media], max_images: int, videos: VideoLoader | None, video_options: VideoOptions | None
) -> None:
    """Counts and sampling checked before any download; each video's sampling set."""
    images = sum(item.kind == "image" for item in media)
    if images > max_images:
        raise InvalidRequest(
            f"The request has {images} images; this server accepts at most {max_images} "
            "(SNARK_MAX_IMAGES_PER_REQUEST).",
            param="messages",
        )
    clips = [item for item in media if item.kind != "image"]
    if not clips:
        return
    if videos is None:
        raise InvalidRequest("This endpoint takes no videos; send them to /v1/chat/completions.", param=clips[0].param)
    if len(clips) > videos.limits.max_videos_per_request:
        raise InvalidRequest(
            f"The request has {len(clips)} videos; this server accepts at most {videos.limits.max_videos_per_request} "
            "(SNARK_MAX_VIDEOS_PER_REQUEST).",
            param="messages",
        )
    for item in clips:
        if item.kind == "frames" and len(item.source) > videos.caps.max_frames:
            raise InvalidRequest(
                f"{item.param} has {len(item.source)} frames; this server takes at most {videos.caps.max_frames} a "
                "video (SNARK_MAX_VIDEO_FRAMES): send fewer frames.",
                param=item.param,
                code="video_too_many_frames",
            )
        if item.kind == "frames" and not item.source:
            raise InvalidRequest(
                f"{item.param} is an empty list: send the video's frames as image URLs.", param=item.param
            )
        try:
            item.sampling = video_sampling(videos, *item.layers, video_options)
        except SnarkError as exc:  # name the part: messages[0].content[1].video_end
            exc.param = exc.param and f"{item.part}.{exc.param}"
            raise


def _parse_message(i: int, message: ChatMessage, media: list[_Media]) -> tuple[str, list[str | int], list[ToolCall]]:
    """(engine role, parts, tool calls): text stays text, an image or video becomes its index in
    ``media`` (appended here); an assistant message's tool calls come along for the prompt."""
    where = f"messages[{i}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(
            f"{where}.role {message.role!r} is not supported: use system, developer, user, assistant or tool.",
            param=f"{where}.role",
        )
    calls = _history_calls(where, role, message.tool_calls)
    role, parts = _message_parts(where, role, message, media, has_calls=bool(calls))
    return role, parts, calls


def _history_calls(where: str, role: str, tool_calls: list[AssistantToolCall] | None) -> list[ToolCall]:
    if not tool_calls:
        return []
    if role != "assistant":
        raise InvalidRequest(
            f"{where}.tool_calls: only assistant messages carry tool calls.", param=f"{where}.tool_calls"
        )
    calls = []
    for j, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}].function.arguments"
        try:
            arguments = json.loads(call.function.arguments)
        except (json.JSONDecodeError, RecursionError):  # nested too deep to be a call's arguments
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f'{at} must be a JSON object in a string, such as \'{{"city": "Paris"}}\'.', param=at)
        calls.append(ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments))
    return calls


def _message_parts(
    where: str, role: str, message: ChatMessage, media: list[_Media], *, has_calls: bool
) -> tuple[str, list[str | int]]:
    if message.content is None and message.audio is not None and role == "assistant":
        return role, [transcript_of(message.audio.id, param=f"{where}.audio.id")]  # the spoken answer's text
    if message.content is None and has_calls:
        return role, []  # an assistant turn that only called tools
    if message.content is None:
        raise InvalidRequest(f"{where}.content is missing: send a string or a list of parts.", param=f"{where}.content")
    if isinstance(message.content, str):
        return role, [message.content]
    parts: list[str | int] = []
    for j, part in enumerate(message.content):
        at = f"{where}.content[{j}]"
        if part.type == "text" and part.text is not None:
            parts.append(part.text)
            continue
        item = _media_part(at, part)
        if item is None:
            raise InvalidRequest(
                f"{at}: a part is {{'type': 'text', 'text': ...}}, "
                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}} "
                f"or {{'type': 'video_url', 'video_url': {{'url': ...}}}}; got type {part.type!r}.",
                param=f"{at}.type",
            )
        if role != "user":
            raise InvalidRequest(f"{at}: images and videos are only accepted in user messages.", param=at)
        parts.append(len(media))
        media.append(item)
    return role, parts


def _media_part(at: str, part: ContentPart) -> _Media | None:
    if part.type == "image_url" and part.image_url is not None:
        return _Media(f"{at}.image_url.url", at, "image", part.image_url.url, layers=(part,), image_url=part.image_url)
    if part.type == "video_url" and part.video_url is not None:
        return _Media(f"{at}.video_url.url", at, "video", part.video_url.url, layers=(part.video_url, part))
    if part.type == "video" and part.video is not None:
        return _Media(
            f"{at}.video", at, "video" if isinstance(part.video, str) else "frames", part.video, layers=(part,)
        )
    return None


async def _load_all(
    media: list[_Media], load_image: Callable[[str], Awaitable[Image.Image]], videos: VideoLoader | None
) -> list[Image.Image | ImagePart | Video]:
    async def load(item: _Media) -> Image.Image | ImagePart | Video:
        try:
            if item.kind == "image" and isinstance(item.source, str):
                image = await load_image(item.source)
                return image if item.bounds is None else ImagePart(image, *item.bounds)
            if videos is None or item.sampling is None:  # _check_counts refused these before any download
                raise RuntimeError(f"{item.param} reached loading without a video loader or sampling")
            if isinstance(item.source, str):
                return await videos.url(item.source, item.sampling)
            frames = await _load_frames(item, load_image)
            return await videos.frames(frames, item.sampling)
        except SnarkError as exc:
            exc.param = exc.param or item.param  # say which image or video failed
            raise

    try:  # a TaskGroup cancels the other fetches as soon as one fails
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(load(item)) for item in media]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _load_frames(item: _Media, load_image: Callable[[str], Awaitable[Image.Image]]) -> list[Image.Image]:
    async def frame(k: int, url: str) -> Image.Image:
        try:
            return await load_image(url)
        except SnarkError as exc:
            exc.param = exc.param or f"{item.param}[{k}]"
            raise

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(frame(k, url)) for k, url in enumerate(item.source)]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
