"""The ``input`` (and ``instructions``) of a Responses request, and how they become chat messages.

    "Hello"                                                     -> one user message
    {"role": "user", "content": [input_text, input_image, input_video]}  -> a user message, its parts
    {"role": "assistant", "content": [output_text]}             -> an assistant turn of the history
    {"type": "function_call", "call_id", "name", "arguments"}   -> a call of the assistant turn before it
    {"type": "function_call_output", "call_id", "output"}       -> that call's result (a tool turn)
    instructions                                                -> a system message first

The messages then take chat's own way (``messages_to_turns``): the same checks, the same image and
video loaders and limits. Every item is checked here first, so a mistake is a 400 naming the
request's own field (``input[2].content[1].image_url``); what chat's pipeline raises later (an image
that does not load, too many videos) is renamed to the request's fields too (``ChatInput.renamed``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from snark.api.image_resolution import ImageResolution
from snark.api.lenient import Lenient
from snark.api.messages import (
    AssistantToolCall,
    CalledFunction,
    ChatMessage,
    ContentPart,
    VideoOptions,
    messages_to_turns,
)
from snark.errors import InvalidRequest, SnarkError
from snark.values import ChatTurn
from snark.video.load import VideoLoader

_PARTS_HELP = (
    "a part is {'type': 'input_text', 'text': ...}, {'type': 'input_image', 'image_url': URL or data: URI} "
    "or {'type': 'input_video', 'video_url': URL or data: URI}"
)
_ITEMS_HELP = "an input item is a message ({'role': ..., 'content': ...}), a function_call or a function_call_output"


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Any]


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as a JSON object in a string, as the model wrote them.")


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Any]


class TextPart(Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(Lenient):
    type: Literal["refusal"]
    refusal: str


class ImagePart(Lenient):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="http(s) URL or data:image/...;base64, URI")
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class VideoPart(VideoOptions):
    type: Literal["input_video"]
    video_url: str = Field(description="http(s) URL or data:video/...;base64, URI")


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], value: Any, where: str) -> M:
    """``value`` as ``model``; a 400 naming the field at ``where`` otherwise."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object; got {json.dumps(value)[:100]}.", param=where)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        at = where + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}"
            for p in error["loc"]
            if isinstance(p, int) or ("[" not in p and p not in ("str", "list"))  # not a union branch's name
        )
        raise InvalidRequest(f"{at}: {error['msg']}.", param=at) from None


@dataclass
class ChatInput:
    """The request's conversation as chat messages, and where each came from in the request."""

    messages: list[ChatMessage] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # per message: "instructions", "input", "input[3]"

    def add(self, message: ChatMessage, where: str) -> None:
        self.messages.append(message)
        self.where.append(where)

    def renamed(self, exc: SnarkError) -> SnarkError:
        """``exc`` (raised by chat's pipeline, in chat's names) naming the request's own fields."""

        def rename(text: str) -> str:
            text = re.sub(r"messages\[(\d+)\]", lambda m: self.where[int(m.group(1))], text)
            return text.replace(".image_url.url", ".image_url").replace(".video_url.url", ".video_url")

        exc.message = rename(exc.message)
        exc.args = (exc.message,)
        if exc.param is not None:
            exc.param = "input" if exc.param == "messages" else rename(exc.param)
        return exc

    async def to_turns(
        self,
        load_image: Callable[[str], Awaitable[Image.Image]],
        *,
        max_images: int,
        videos: VideoLoader,
        video_options: VideoOptions | None,
        image_resolution: ImageResolution | None = None,
    ) -> list[ChatTurn]:
        """The chat turns, images and videos fetched as chat fetches them (each image at the resolution its
        ``detail`` or pixel bounds ask for, within ``image_resolution``'s caps)."""
        try:
            return await messages_to_turns(
                self.messages,
                load_image,
                max_images=max_images,
                videos=videos,
                video_options=video_options,
                image_resolution=image_resolution,
            )
        except SnarkError as exc:
            raise self.renamed(exc) from None


def chat_input(instructions: str | None, input_: str | list[Any]) -> ChatInput:
    """``instructions`` and ``input`` as chat messages, every item checked."""
    chat = ChatInput()
    if instructions:
        chat.add(ChatMessage(role="system", content=instructions), "instructions")
    if isinstance(input_, str):
        chat.add(ChatMessage(role="user", content=input_), "input")
        return chat
    if not input_:
        raise InvalidRequest("input is empty: send a string or a list of messages.", param="input")
    calls = _called_ids(input_)
    caller: ChatMessage | None = None  # the assistant message that function_call items join
    for i, raw in enumerate(input_):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{where}: {_ITEMS_HELP}; got {json.dumps(raw)[:100]}.", param=where)
        kind = raw.get("type", "message")
        if kind == "message":
            item = _parse(MessageItem, raw, where)
            message = ChatMessage(role=item.role, content=_content(item, where))
            chat.add(message, where)
            caller = message if item.role == "assistant" else None
        elif kind == "function_call":
            call = _parse(FunctionCallItem, raw, where)
            _check_arguments(call.arguments, f"{where}.arguments")
            tool_call = AssistantToolCall(
                id=call.call_id, function=CalledFunction(name=call.name, arguments=call.arguments)
            )
            if caller is None:
                caller = ChatMessage(role="assistant", content=None, tool_calls=[])
                chat.add(caller, where)
            caller.tool_calls = [*(caller.tool_calls or []), tool_call]
        elif kind == "function_call_output":
            result = _parse(FunctionCallOutputItem, raw, where)
            if result.call_id not in calls:
                raise InvalidRequest(
                    f"{where}.call_id {result.call_id!r} answers no function_call in input: send the call "
                    "(the function_call item the response gave) before its output.",
                    param=f"{where}.call_id",
                )
            chat.add(ChatMessage(role="tool", content=_output_text(result, where), tool_call_id=result.call_id), where)
            caller = None
        else:
            raise InvalidRequest(
                f"{where}: {_ITEMS_HELP}; type {kind!r} is not supported by Snark.", param=f"{where}.type"
            )
    return chat


def _called_ids(items: list[Any]) -> set[str]:
    return {
        item["call_id"]
        for item in items
        if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("call_id"), str)
    }


def _check_arguments(arguments: str, at: str) -> None:
    try:
        parsed = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):  # nested too deep to be a call's arguments
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f'{at} must be a JSON object in a string, such as \'{{"city": "Paris"}}\'.', param=at)


def _content(item: MessageItem, where: str) -> str | list[ContentPart]:
    if isinstance(item.content, str):
        return item.content
    return [_part(raw, f"{where}.content[{j}]", item.role) for j, raw in enumerate(item.content)]


def _part(raw: Any, at: str, role: str) -> ContentPart:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in ("input_text", "output_text"):
        return _chat_part(type="text", text=_parse(TextPart, raw, at).text)
    if kind == "refusal":  # an earlier answer's refusal, sent back as history: its text
        return _chat_part(type="text", text=_parse(RefusalPart, raw, at).refusal)
    if kind in ("input_image", "input_video") and role != "user":
        raise InvalidRequest(f"{at}: images and videos are only accepted in user messages.", param=at)
    if kind == "input_image":
        image = _parse(ImagePart, raw, at)
        if image.image_url is None:
            raise InvalidRequest(
                f"{at}: send the image as image_url (an http(s) URL or a data: URI); Snark keeps no files, "
                "so file_id is not supported.",
                param=f"{at}.image_url",
            )
        detail = "high" if image.detail == "original" else image.detail  # the server's largest size either way
        return _chat_part(type="image_url", image_url={"url": image.image_url, "detail": detail})
    if kind == "input_video":
        video = _parse(VideoPart, raw, at)
        return _chat_part(type="video_url", video_url={"url": video.video_url, **video.given()})
    if kind == "input_file":
        raise InvalidRequest(
            f"{at}: input_file is not supported: Snark reads text, images and videos; send a document's pages "
            "as input_image parts or its text as input_text.",
            param=f"{at}.type",
            code="unsupported_parameter",
        )
    raise InvalidRequest(f"{at}: {_PARTS_HELP}; got type {kind!r}.", param=f"{at}.type")


def _chat_part(**fields: Any) -> ContentPart:
    """A chat content part (checked when its item was; validated again as chat's own model)."""
    return ContentPart.model_validate(fields)


def _output_text(result: FunctionCallOutputItem, where: str) -> str:
    """A call's output as the text of its tool turn: a string, or input_text parts joined."""
    if isinstance(result.output, str):
        return result.output
    texts = []
    for j, raw in enumerate(result.output):
        at = f"{where}.output[{j}]"
        if not isinstance(raw, dict) or raw.get("type") != "input_text":
            raise InvalidRequest(
                f"{at}: a function's output is text here: send a string or input_text parts.", param=at
            )
        texts.append(_parse(TextPart, raw, at).text)
    return "".join(texts)
