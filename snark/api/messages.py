"""Chat messages as OpenAI sends them, and how they become ``ChatTurn``s: roles mapped, every
part checked (an image only in a user message, a tool call's arguments a JSON object), then the
images fetched all at once. A malformed message is a 400 naming where it is, before any download.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Literal

from PIL import Image
from pydantic import Field

from snark.api.chat_audio import transcript_of
from snark.api.lenient import Lenient
from snark.engine.request import ChatTurn, ToolCall
from snark.errors import InvalidRequest, SnarkError

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ImageURL(Lenient):
    url: str = Field(description="http(s) URL or data:image/...;base64, URI")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted and ignored: the resolution is SNARK_MIN/MAX_IMAGE_PIXELS for every image."
    )


class ContentPart(Lenient):
    type: str = Field(description="'text' or 'image_url'")
    text: str | None = None
    image_url: ImageURL | None = None


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
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: which call this is the result of
    audio: MessageAudio | None = None


async def messages_to_turns(
    messages: list[ChatMessage], load_image: Callable[[str], Awaitable[Image.Image]], *, max_images: int
) -> list[ChatTurn]:
    """``messages`` -> chat turns, images fetched concurrently with ``load_image``."""
    sources: list[tuple[str, str]] = []  # (param path, url) of every image, in order
    layout = [_parse_message(i, message, sources) for i, message in enumerate(messages)]
    if len(sources) > max_images:
        raise InvalidRequest(
            f"The request has {len(sources)} images; this server accepts at most {max_images} "
            "(SNARK_MAX_IMAGES_PER_REQUEST).",
            param="messages",
        )
    images = await _load_all(sources, load_image)
    return [
        ChatTurn(role, [images[p] if isinstance(p, int) else p for p in parts], tool_calls=calls)
        for role, parts, calls in layout
    ]


def _parse_message(i: int, message: ChatMessage, sources: list[tuple[str, str]]) -> tuple[str, list[str | int], list[ToolCall]]:
    """(engine role, parts, tool calls): text stays text, an image becomes its index in ``sources``
    (appended here); an assistant message's tool calls come along for the prompt."""
    where = f"messages[{i}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(
            f"{where}.role {message.role!r} is not supported: use system, developer, user, assistant or tool.",
            param=f"{where}.role",
        )
    calls = _history_calls(where, role, message.tool_calls)
    role, parts = _message_parts(where, role, message, sources, has_calls=bool(calls))
    return role, parts, calls


def _history_calls(where: str, role: str, tool_calls: list[AssistantToolCall] | None) -> list[ToolCall]:
    if not tool_calls:
        return []
    if role != "assistant":
        raise InvalidRequest(f"{where}.tool_calls: only assistant messages carry tool calls.", param=f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}].function.arguments"
        try:
            arguments = json.loads(call.function.arguments)
        except (json.JSONDecodeError, RecursionError):  # nested too deep to be a call's arguments
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{at} must be a JSON object in a string, such as '{{\"city\": \"Paris\"}}'.", param=at)
        calls.append(ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments))
    return calls


def _message_parts(
    where: str, role: str, message: ChatMessage, sources: list[tuple[str, str]], *, has_calls: bool
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
        elif part.type == "image_url" and part.image_url is not None:
            if role != "user":
                raise InvalidRequest(f"{at}: images are only accepted in user messages.", param=at)
            parts.append(len(sources))
            sources.append((f"{at}.image_url.url", part.image_url.url))
        else:
            raise InvalidRequest(
                f"{at}: a part is {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}; got type {part.type!r}.",
                param=f"{at}.type",
            )
    return role, parts


async def _load_all(sources: list[tuple[str, str]], load_image: Callable[[str], Awaitable[Image.Image]]) -> list[Image.Image]:
    async def load(param: str, url: str) -> Image.Image:
        try:
            return await load_image(url)
        except SnarkError as exc:
            exc.param = exc.param or param  # say which image failed
            raise

    try:  # a TaskGroup cancels the other fetches as soon as one image fails
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(load(param, url)) for param, url in sources]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
