"""OpenAI response bodies for ``/v1/completions``: the JSON completion, the SSE stream, and the older
log-probability shape that API uses.

    {"id": "cmpl-...", "object": "text_completion", "created": ..., "model": ...,
     "choices": [{"text": "...", "index": 0, "logprobs": null | {...}, "finish_reason": "length"}],
     "usage": {"prompt_tokens": ..., "completion_tokens": ..., "total_tokens": ...}}

    "logprobs": {"tokens": ["Hello", ","], "token_logprobs": [null, -2.3],
                 "top_logprobs": [null, {",": -2.3, "!": -1.1}], "text_offset": [0, 5]}

Each token's ``top_logprobs`` holds the chosen token first, then the ``logprobs`` most likely ones (so
up to logprobs + 1 entries, as OpenAI documents and vLLM sends). With ``echo`` the prompt's tokens come
first and the first of them has no log-probability (nothing comes before it). ``text_offset`` is where
each token's text starts in the choice's text; log-probabilities below -9999 are sent as -9999 (JSON
has no -inf), as vLLM does. A stream sends, per choice, the echoed prompt first, then each delta with
the tokens behind it, then a chunk with its ``finish_reason``; choices interleave by ``index``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snark.api.cancellation import within
from snark.api.choices import Choice, Choices
from snark.api.replies import sse_line
from snark.api.streaming import finish_reason_of
from snark.engine.request import GenerationRequest, StreamEvent
from snark.values import FinishReason, TokenLogprob

LOWEST_LOGPROB = -9999.0


@dataclass(frozen=True)
class Echo:
    """What ``echo`` puts before a prompt's answers: its text, and its ids (for their log-probabilities)."""

    text: str
    ids: Sequence[int]


@dataclass(frozen=True)
class Answer:
    """One choice of a finished completion."""

    prompt_index: int
    generated: GenerationRequest | None  # None: nothing was generated (max_tokens=0)
    scored: GenerationRequest | None  # the request that scored its prompt (choice 0 of the prompt)


class LegacyLogprobs:
    """One choice's log-probabilities in the older shape, block by block (a stream sends a block per
    chunk), with ``text_offset`` running on across blocks."""

    def __init__(self, top: int, token_text: Callable[[int], str]) -> None:
        self.top = top
        self.token_text = token_text
        self.offset = 0

    def block(self, prompt: Sequence[tuple[int, TokenLogprob | None]], generated: Sequence[TokenLogprob]) -> dict:
        """``prompt``: echoed prompt tokens (id, entry or None); ``generated``: the answer's tokens."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        entries = [(token_id, entry) for token_id, entry in prompt] + [(entry.token_id, entry) for entry in generated]
        for token_id, entry in entries:
            token = entry.token if entry is not None else self.token_text(token_id)
            tokens.append(token)
            text_offset.append(self.offset)
            self.offset += len(token)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_clamped(entry.logprob))
            top = {entry.token: _clamped(entry.logprob)}
            for _, text, logprob in entry.top[: self.top]:
                top.setdefault(text, _clamped(logprob))
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def _clamped(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def prompt_entries(echo: Echo, scored: GenerationRequest | None) -> list[tuple[int, TokenLogprob | None]]:
    """The echoed prompt's tokens with the log-probabilities ``scored`` (the prompt's first choice) reported."""
    found = scored.prompt_logprobs if scored is not None else None
    if found is None or len(found) != len(echo.ids):
        raise RuntimeError(
            f"the engine reported {'no' if found is None else len(found)} prompt log-probabilities "
            f"for a prompt of {len(echo.ids)} tokens"
        )
    return list(zip(echo.ids, found))


class CompletionReply:
    """The fixed parts of one completion (id, created, model) and the bodies built on them."""

    def __init__(
        self, *, model: str, logprobs: int | None, echoes: Sequence[Echo] | None, token_text: Callable[[int], str]
    ) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs  # None: off; k: the chosen token and k alternatives each
        self.echoes = echoes  # per prompt, with echo; None without
        self.token_text = token_text

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        total = prompt_tokens + completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def _body(self, choices: list[dict]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}

    def completion(self, answers: Sequence[Answer], usage: dict) -> dict:
        """The JSON answer: one choice per answer, in order."""
        choices = []
        for index, answer in enumerate(answers):
            done = answer.generated
            logprobs = None
            if self.logprobs is not None:
                writer = LegacyLogprobs(self.logprobs, self.token_text)
                logprobs = writer.block(self._echoed(answer.prompt_index, answer.scored), done.logprobs if done else [])
            text = (self.echoes[answer.prompt_index].text if self.echoes is not None else "") + (
                done.text if done else ""
            )
            reason = finish_reason_of(done.finish_reason) if done is not None else FinishReason.LENGTH.value
            choices.append(self._choice(index, text, logprobs, reason))
        return {**self._body(choices), "usage": usage}

    def _echoed(self, prompt_index: int, scored: GenerationRequest | None) -> list[tuple[int, TokenLogprob | None]]:
        return prompt_entries(self.echoes[prompt_index], scored) if self.echoes is not None else []

    def scored_events(
        self, answers: Sequence[Answer], usage: dict | None, *, usage_field: bool
    ) -> AsyncGenerator[str, None]:
        """``max_tokens=0`` streamed: each choice's echoed prompt, then its final chunk."""

        async def lines() -> AsyncGenerator[str, None]:
            for index, answer in enumerate(answers):
                logprobs = None
                if self.logprobs is not None:
                    logprobs = LegacyLogprobs(self.logprobs, self.token_text).block(
                        self._echoed(answer.prompt_index, answer.scored), []
                    )
                text = self.echoes[answer.prompt_index].text if self.echoes is not None else ""
                yield self.chunk(index, text, logprobs, usage_field=usage_field)
                yield self.chunk(index, "", None, FinishReason.LENGTH.value, usage_field=usage_field)
            if usage is not None:
                yield self.usage_chunk(usage)

        return lines()

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: dict | None = None,
        finish_reason: str | None = None,
        *,
        usage_field: bool,
    ) -> str:
        body = self._body([self._choice(index, text, logprobs, finish_reason)])
        if usage_field:
            body["usage"] = None  # with include_usage, every chunk but the last has usage: null (as chat)
        return sse_line(body)

    def usage_chunk(self, usage: dict) -> str:
        return sse_line({**self._body([]), "usage": usage})


async def completion_events(
    reply: CompletionReply, choices: Choices, *, include_usage: bool, timeout_s: float
) -> AsyncGenerator[str, None]:
    """The SSE body of a streamed completion: each choice's echoed prompt (once its log-probabilities
    are known, with ``logprobs``), its deltas as the engine writes them, and its final chunk. Wrap it
    in ``sse_stream`` for the error event and ``[DONE]``."""
    writers = (
        {c.index: LegacyLogprobs(reply.logprobs, reply.token_text) for c in choices.choices}
        if reply.logprobs is not None
        else {}
    )
    unechoed = {c.index for c in choices.choices} if reply.echoes is not None else set()
    held: dict[int, list[StreamEvent]] = {}  # events behind an echo that waits for the prompt's logprobs

    def send(choice: Choice, event: StreamEvent) -> list[str]:
        lines = []
        if event.text or event.logprobs:
            logprobs = writers[choice.index].block([], event.logprobs) if writers else None
            lines.append(reply.chunk(choice.index, event.text, logprobs, usage_field=include_usage))
        if event.finish_reason is not None:
            reason = finish_reason_of(event.finish_reason)
            lines.append(reply.chunk(choice.index, "", None, reason, usage_field=include_usage))
        return lines

    def echo(choice: Choice, *, last: bool) -> list[str]:
        """The choice's echo and the events held behind it, once it can go out."""
        scored = choices.first_of(choice)
        if writers and scored.prompt_logprobs is None and not last:
            return []
        assert reply.echoes is not None
        prompt = reply.echoes[choice.prompt_index]
        logprobs = writers[choice.index].block(prompt_entries(prompt, scored), []) if writers else None
        lines = [reply.chunk(choice.index, prompt.text, logprobs, usage_field=include_usage)]
        unechoed.discard(choice.index)
        for event in held.pop(choice.index, []):
            lines += send(choice, event)
        return lines

    async for choice, event in within(choices.events(), timeout_s):
        if choice.index in unechoed:
            held.setdefault(choice.index, []).append(event)
        else:
            for line in send(choice, event):
                yield line
        for waiting in [c for c in choices.choices if c.index in unechoed]:
            for line in echo(waiting, last=False):
                yield line
    for waiting in [c for c in choices.choices if c.index in unechoed]:
        for line in echo(waiting, last=True):
            yield line
    if include_usage:
        yield reply.usage_chunk(reply.usage(choices.prompt_tokens, choices.completion_tokens))
