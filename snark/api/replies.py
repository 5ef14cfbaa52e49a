"""OpenAI response bodies for chat: the JSON completion, and the Server-Sent Events stream.

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": "Hel"}}], ...}
    data: {... "delta": {"content": "lo"} ...}
    data: {... "delta": {}, "finish_reason": "stop"}
    data: {... "choices": [], "usage": {...}}          (only with stream_options.include_usage)
    data: [DONE]

The role travels with the first generated text, as vLLM sends it, so a client that times the first
token from the first chunk with content measures when the model really answered, not when the
request arrived. An answer with no text at all still gets its role chunk before the final one.

An error after the stream has started cannot change the 200 status any more; it is sent as a
``data: {"error": {...}}`` event in the one error shape, which OpenAI clients raise as ``APIError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from snark.api.cancellation import within
from snark.api.choices import Choices
from snark.api.errors import error_body
from snark.api.logprobs import chat_logprobs
from snark.api.streaming import finish_reason_of
from snark.engine.request import GenerationRequest
from snark.errors import SnarkError
from snark.structured.tool_calls import ToolCallDelta, ToolCallStream, parse_tool_calls
from snark.values import TokenLogprob, ToolCall

log = logging.getLogger(__name__)


class ChatReply:
    """The fixed parts of one completion (id, created, model, prompt tokens) and the bodies built on them."""

    def __init__(self, *, model: str, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens  # images included: each is its <|image_pad|> tokens
        self._content_templates: dict[tuple[bool, int], tuple[str, str]] = {}

    def usage(self, completion_tokens: int) -> dict:
        total = self.prompt_tokens + completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def completion(self, *dones: GenerationRequest, tool_names: set[str] | None = None) -> dict:
        """The JSON answer: one choice per request in ``dones`` (``n`` of them), usage over all of them."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(index, done, tool_names) for index, done in enumerate(dones)],
            "usage": self.usage(sum(done.completion_tokens for done in dones)),
        }

    def _choice(self, index: int, done: GenerationRequest, tool_names: set[str] | None) -> dict:
        """One choice. With ``tool_names`` (the model may call these), the calls in its text become
        ``tool_calls`` and finish_reason "tool_calls"; what is not a call stays the content."""
        message: dict[str, Any] = {"role": "assistant", "content": done.text, "refusal": None}
        finish_reason = finish_reason_of(done.finish_reason)
        if tool_names is not None:  # what is not a call is the content, as the stream sends it
            content, calls = parse_tool_calls(done.text, known=tool_names)
            message["content"] = content if calls else (content or "")
            if calls:
                message["tool_calls"] = [_call_json(call) for call in calls]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        logprobs = chat_logprobs(done.logprobs) if done.params.logprobs is not None else None
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk(
        self,
        delta: dict,
        finish_reason: str | None = None,
        *,
        usage_field: bool = False,
        index: int = 0,
        logprobs: dict | None = None,
    ) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
        }
        if usage_field:
            body["usage"] = None  # with include_usage, OpenAI sends usage: null on every chunk but the last
        return body

    def content_sse(self, text: str, *, usage_field: bool, index: int = 0) -> str:
        """``sse_line(self.chunk({"content": text}, usage_field=...))``, the body of nearly every event,
        from a serialized template: only the text is encoded per token."""
        template = self._content_templates.get((usage_field, index))
        if template is None:
            marker = "\x00"
            body = _json(self.chunk({"content": marker}, usage_field=usage_field, index=index))
            prefix, suffix = body.split(_json(marker), 1)
            template = self._content_templates[(usage_field, index)] = (prefix, suffix)
        prefix, suffix = template
        return f"data: {prefix}{_json(text)}{suffix}\n\n"

    def usage_chunk(self, completion_tokens: int) -> dict:
        body = self.chunk({}, usage_field=True)
        body["choices"], body["usage"] = [], self.usage(completion_tokens)
        return body


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def sse_line(body: dict | str) -> str:
    """One Server-Sent Event: ``data: <JSON or text>`` and the blank line that ends it."""
    data = body if isinstance(body, str) else _json(body)
    return f"data: {data}\n\n"


async def chat_events(
    reply: ChatReply,
    choices: Choices,
    *,
    include_usage: bool,
    timeout_s: float,
    tool_names: set[str] | None = None,
) -> AsyncGenerator[str, None]:
    """The SSE body for one streamed completion: every choice's deltas (``n``), interleaved by
    ``index`` as they come, each sent as soon as the engine produced it (already whole characters),
    each choice with its own role chunk and ``finish_reason``. With ``tool_names``, calls in the text
    go out as OpenAI streams them: ``delta.tool_calls`` items, the first with the call's id and name,
    the next ones with pieces of its arguments. Wrap it in ``sse_stream`` for the error event and ``[DONE]``.
    With logprobs, a token's entry goes out with the choice's first chunk that follows its event: with
    the text it produced, or, for text held back by the tool-call scanner or a token with no text of
    its own (end of turn), with a later chunk, the finish chunk at the latest."""
    role_sent: set[int] = set()
    calls = {c.index: ToolCallStream(known=tool_names) for c in choices.choices} if tool_names is not None else {}
    held: dict[int, list[TokenLogprob]] = {}  # per choice, the entries its next chunk carries

    def logprobs_of(index: int) -> dict | None:
        entries = held.pop(index, None)
        return chat_logprobs(entries) if entries else None

    async for choice, event in within(choices.events(), timeout_s):
        index, stream = choice.index, calls.get(choice.index)
        if event.logprobs:
            held.setdefault(index, []).extend(event.logprobs)
        pieces = [event.text] if stream is None else stream.feed(event.text)
        if event.finish_reason is not None and stream is not None:
            pieces += stream.finish()
        for piece in pieces:
            if isinstance(piece, ToolCallDelta):
                delta: dict[str, Any] = {"tool_calls": [piece.to_openai()]}
                if index not in role_sent:
                    role_sent.add(index)
                    delta = {"role": "assistant", "content": None, **delta}
                yield sse_line(reply.chunk(delta, usage_field=include_usage, index=index, logprobs=logprobs_of(index)))
            elif piece and index in role_sent and index not in held:
                yield reply.content_sse(piece, usage_field=include_usage, index=index)
            elif piece:
                delta = {"content": piece} if index in role_sent else {"role": "assistant", "content": piece}
                role_sent.add(index)
                yield sse_line(reply.chunk(delta, usage_field=include_usage, index=index, logprobs=logprobs_of(index)))
        if event.finish_reason is not None:
            if index not in role_sent:
                role_sent.add(index)
                yield sse_line(
                    reply.chunk({"role": "assistant", "content": ""}, usage_field=include_usage, index=index)
                )
            finish_reason = finish_reason_of(event.finish_reason)
            if stream is not None and stream.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            yield sse_line(
                reply.chunk({}, finish_reason, usage_field=include_usage, index=index, logprobs=logprobs_of(index))
            )
    if include_usage:
        yield sse_line(reply.usage_chunk(choices.completion_tokens))


async def sse_stream(lines: AsyncGenerator[str, None], what: str) -> AsyncIterator[str]:
    """``lines`` (SSE events), then ``data: [DONE]``. The 200 has gone out by then, so an error raised
    on the way cannot change the status any more: it is sent as one ``data: {"error": {...}}`` event in
    the one error shape, which OpenAI clients raise as ``APIError``, and the stream still ends."""
    try:
        async with contextlib.aclosing(lines):  # a client gone closes ``lines`` now: its row is cancelled
            async for line in lines:
                yield line
    except SnarkError as exc:
        yield sse_line(error_body(exc.message, type_=exc.type, code=exc.code, param=exc.param))
    except Exception:  # a bug: the client still gets the one error shape
        log.exception("%s failed", what)
        yield sse_line(
            error_body(
                "Internal server error (a bug in Snark; see the server log).",
                type_="server_error",
                code="internal_error",
            )
        )
    yield sse_line("[DONE]")
