"""The answer of ``/v1/responses``: the response object, its output items, and the streamed events.

    {"id": "resp_...", "object": "response", "status": "completed", "output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": ..., "annotations": []}]},
        {"type": "function_call", "call_id": "call_...", "name": ..., "arguments": "{...}"}], "usage": {...}, ...}

Streamed (``stream: true``), each event an SSE ``event: TYPE`` / ``data: {...}`` pair with a
``sequence_number``, in OpenAI's order::

    response.created, response.in_progress
    response.output_item.added (message), response.content_part.added,
        response.output_text.delta ..., response.output_text.done, response.content_part.done,
        response.output_item.done
    response.output_item.added (function_call), response.function_call_arguments.delta ...,
        response.function_call_arguments.done, response.output_item.done
    response.completed | response.incomplete (max_output_tokens reached)

An error once the stream has started (the request timed out, the server is stopping) is an ``error``
event in Snark's error shape (code, message, param), then ``response.failed``.

``OutputItems`` builds the items from the generated text as it comes (tool calls parsed by chat's
``ToolCallStream``), so a streamed response and a plain one are built by the same code: the plain one
is the stream fed the whole text at once.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from snark.api.cancellation import within
from snark.api.streaming import finish_reason_of
from snark.engine.request import GenerationRequest, StreamEvent
from snark.errors import SnarkError
from snark.structured.tool_calls import ToolCallDelta, ToolCallStream
from snark.values import FinishReason

log = logging.getLogger(__name__)


def response_status(reason: FinishReason | None) -> str:
    """ "completed", or "incomplete" when max_output_tokens ended the answer. A row stopped by shutdown
    raises ``ShuttingDown``."""
    return "completed" if finish_reason_of(reason) == "stop" else "incomplete"


class ResponseReply:
    """The fixed parts of one response (id, creation time, model, prompt tokens, the request's settings
    it echoes) and the response objects built on them."""

    def __init__(self, *, model: str, prompt_tokens: int, echo: dict[str, Any]) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens  # images included: each is its <|image_pad|> tokens
        self.echo = echo

    def body(
        self,
        output: list[dict],
        *,
        status: str,
        completion_tokens: int | None = None,
        error: dict | None = None,
    ) -> dict:
        finished = status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if finished else None,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": output,
            **self.echo,
            "usage": None if completion_tokens is None else self.usage(completion_tokens),
        }

    def usage(self, completion_tokens: int) -> dict:
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, done: GenerationRequest, *, tool_names: set[str] | None) -> dict:
        """The JSON answer for a finished generation."""
        status = response_status(done.finish_reason)
        output = OutputItems(tool_names)
        output.feed(done.text)
        output.finish(complete=status == "completed")
        return self.body(output.items, status=status, completion_tokens=done.completion_tokens)


class OutputItems:
    """A response's output items, built from the generated text delta by delta, and the stream events
    that build them (without their sequence numbers). With ``tool_names`` (the model may call these),
    calls in the text become function_call items and the text around them message items."""

    def __init__(self, tool_names: set[str] | None) -> None:
        self.items: list[dict] = []
        self._calls = ToolCallStream(known=tool_names) if tool_names is not None else None
        self._open: dict | None = None  # the item being written, the last of ``items``
        self._text: list[str] = []  # the open message's text so far
        self._announced = 0  # function_call items opened

    def feed(self, text: str) -> list[dict]:
        return self._take([text] if self._calls is None else self._calls.feed(text))

    def finish(self, *, complete: bool) -> list[dict]:
        """The last events; ``complete`` False: the answer was cut at max_output_tokens."""
        events = self._take([] if self._calls is None else self._calls.finish())
        if not self.items:  # an answer with no text and no call still has its (empty) message
            events += self._open_message()
        return events + self._close(complete)

    def snapshot(self) -> list[dict]:
        """The items as they stand, the open message with its text so far."""
        items = copy.deepcopy(self.items)
        if self._open is not None and self._open["type"] == "message":
            items[-1]["content"] = [_text_part("".join(self._text))]
        return items

    def _take(self, pieces: list[str | ToolCallDelta]) -> list[dict]:
        events: list[dict] = []
        for piece in pieces:
            if isinstance(piece, ToolCallDelta) and piece.id is not None:
                events += self._close(True) + self._open_call(piece.id, piece.name or "")
            elif isinstance(piece, ToolCallDelta):
                events += self._arguments(piece.arguments)
            elif piece:
                if self._open is None or self._open["type"] != "message":
                    events += self._close(True) + self._open_message()
                events += self._message_text(piece)
        if self._open is not None and self._open["type"] == "function_call" and self._call_complete():
            events += self._close(True)  # its arguments closed: the call is done now, not at the next piece
        return events

    def _call_complete(self) -> bool:
        """The last call opened is complete (calls complete in order; the stream may be ahead)."""
        return self._calls is not None and len(self._calls.calls) >= self._announced

    def _added(self, item: dict) -> dict:
        self.items.append(item)
        self._open = item
        return {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": copy.deepcopy(item)}

    def _open_message(self) -> list[dict]:
        item: dict[str, Any] = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress"}
        item.update(role="assistant", content=[])
        self._text = []
        added = self._added(item)
        part = {"type": "response.content_part.added", **self._where(), "content_index": 0, "part": _text_part("")}
        return [added, part]

    def _message_text(self, text: str) -> list[dict]:
        self._text.append(text)
        return [
            {"type": "response.output_text.delta", **self._where(), "content_index": 0, "delta": text, "logprobs": []}
        ]

    def _open_call(self, call_id: str, name: str) -> list[dict]:
        self._announced += 1
        item: dict[str, Any] = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress"}
        item.update(call_id=call_id, name=name, arguments="")
        return [self._added(item)]

    def _arguments(self, delta: str) -> list[dict]:
        if self._open is None:  # the stream sends a call's arguments only after announcing it
            raise RuntimeError("function call arguments before the call")
        self._open["arguments"] += delta
        return [{"type": "response.function_call_arguments.delta", **self._where(), "delta": delta}]

    def _where(self) -> dict:
        assert self._open is not None  # every caller has an open item
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _close(self, complete: bool) -> list[dict]:
        item = self._open
        if item is None:
            return []
        where = self._where()
        self._open = None
        if item["type"] == "message":
            text = "".join(self._text)
            item.update(status="completed" if complete else "incomplete", content=[_text_part(text)])
            done = [
                {"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []},
                {"type": "response.content_part.done", **where, "content_index": 0, "part": _text_part(text)},
            ]
        else:  # a call cut off inside its arguments stays incomplete, as its response
            item["status"] = "completed" if self._call_complete() else "incomplete"
            arguments = item["arguments"]
            done = [
                {"type": "response.function_call_arguments.done", **where, "name": item["name"], "arguments": arguments}
            ]
        return [
            *done,
            {"type": "response.output_item.done", "output_index": where["output_index"], "item": copy.deepcopy(item)},
        ]


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def response_stream(
    reply: ResponseReply,
    generation: GenerationRequest,
    events: AsyncIterator[StreamEvent],
    *,
    timeout_s: float,
    tool_names: set[str] | None,
) -> AsyncIterator[str]:
    """The SSE body of one streamed response. ``events`` is the engine's stream for ``generation``;
    each text delta goes out as soon as the engine produced it. The 200 has gone out when an error
    comes, so it is sent as an ``error`` event and ``response.failed``, and the stream ends."""
    output = OutputItems(tool_names)
    numbers = itertools.count()

    def sse(event: dict) -> str:
        event["sequence_number"] = next(numbers)
        return f"event: {event['type']}\ndata: {_json(event)}\n\n"

    started = reply.body([], status="in_progress")
    yield sse({"type": "response.created", "response": started})
    yield sse({"type": "response.in_progress", "response": started})
    lines = _generated(reply, output, generation, events, timeout_s)
    try:
        async with contextlib.aclosing(lines):  # a client gone closes ``lines`` now: its row is cancelled
            async for event in lines:
                yield sse(event)
    except Exception as exc:
        if isinstance(exc, SnarkError):
            code, message, param = exc.code, exc.message, exc.param
        else:  # a bug: the client still gets the one error shape
            log.exception("streamed response %s failed", reply.id)
            code, message, param = "internal_error", "Internal server error (a bug in Snark; see the server log).", None
        yield sse({"type": "error", "code": code, "message": message, "param": param})
        failed = reply.body(
            output.snapshot(),
            status="failed",
            completion_tokens=generation.completion_tokens,
            error={"code": "server_error", "message": message},
        )
        yield sse({"type": "response.failed", "response": failed})


async def _generated(
    reply: ResponseReply,
    output: OutputItems,
    generation: GenerationRequest,
    events: AsyncIterator[StreamEvent],
    timeout_s: float,
) -> AsyncGenerator[dict, None]:
    async for event in within(events, timeout_s):
        for item_event in output.feed(event.text):
            yield item_event
        if event.finish_reason is not None:
            status = response_status(event.finish_reason)
            for item_event in output.finish(complete=status == "completed"):
                yield item_event
            final = reply.body(output.items, status=status, completion_tokens=generation.completion_tokens)
            yield {"type": f"response.{status}", "response": final}
