"""Reading one streamed ``/v1/chat/completions`` reply (server-sent events), as any OpenAI-compatible
server sends it: a role-only chunk, content chunks, with ``stream_options.include_usage`` a last chunk
with ``usage`` and no choices, then ``data: [DONE]``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class StreamError(RuntimeError):
    """The server reported an error inside a stream that had already started."""


@dataclass
class ChatStreamReader:
    """Fed the reply's lines as they arrive, with the time each arrived."""

    content_times: list[float] = field(default_factory=list)  # chunks whose choices carry non-empty content
    text: str = ""  # the answer so far (the first choice's content), for workloads that send it back
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    done: bool = False

    @property
    def first_content_at(self) -> float | None:
        return self.content_times[0] if self.content_times else None

    @property
    def completion_tokens(self) -> int:
        """The server's own count when it sent usage; else the content chunks (one token each on
        servers that send a chunk per token, an undercount on those that pack several)."""
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else len(self.content_times)

    def feed(self, line: str, at: float) -> None:
        if not line.startswith("data:"):  # blank separators, comments (": ping"), event names
            return
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            raise StreamError(f"server error mid-stream: {chunk['error']}")
        # The first chunk usually carries only {"role": "assistant"} (content absent or ""): not a token.
        contents = [(choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ()]
        if any(contents):
            self.content_times.append(at)
            self.text += contents[0] or ""
        if usage := chunk.get("usage"):
            self.usage_completion_tokens = usage["completion_tokens"]
            self.usage_prompt_tokens = usage.get("prompt_tokens")
