"""Reading a generation as a route does, the same for the form routes and the OpenAI routes.

    async for text in text_deltas(engine.follow(generation), timeout_s): ...   # the answer, delta by delta
    finish_reason_of(done.finish_reason)     # "stop" or "length"; a row stopped by shutdown raises
    StreamingResponse(body, headers=STREAM_HEADERS)

A row the engine stopped on its own (the server is shutting down) is never an answer that finished:
``raise_if_shut_down`` turns it into ``ShuttingDown`` (503, or the error that ends a stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from snark.api.cancellation import within
from snark.engine.request import StreamEvent
from snark.errors import ShuttingDown
from snark.values import FinishReason

# Proxies (nginx) buffer responses by default; SSE, text and audio streams must reach the client as written.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def raise_if_shut_down(reason: FinishReason | None) -> None:
    """Raise ``ShuttingDown`` unless the row finished as answers do (stop or length): one the engine
    cancelled on its own never reaches a client as 'cancelled'."""
    if reason is not FinishReason.STOP and reason is not FinishReason.LENGTH:
        raise ShuttingDown("The server is shutting down and stopped this request; retry it.")


def finish_reason_of(reason: FinishReason | None) -> str:
    """The finish_reason a client reads, OpenAI's names: "stop" or "length". Raises as
    ``raise_if_shut_down`` does for a row stopped by shutdown."""
    raise_if_shut_down(reason)
    return str(reason.value)  # type: ignore[union-attr]  # STOP or LENGTH: checked just above


async def text_deltas(events: AsyncIterator[StreamEvent], timeout_s: float) -> AsyncIterator[str]:
    """The answer's text deltas as the engine produced them (whole characters), within ``timeout_s``
    (504 after it); a row stopped by shutdown raises ``ShuttingDown`` at its end."""
    async for event in within(events, timeout_s):
        if event.text:
            yield event.text
        if event.finish_reason is not None:
            raise_if_shut_down(event.finish_reason)
