"""Stop work for clients that went away, and bound every request in time.

A non-streaming handler does not notice a disconnect by itself: ``until_disconnected`` races the
work against the ASGI ``http.disconnect`` message (vLLM's ``with_cancellation`` does the same) and
cancels the work, which cancels the engine row. Streaming responses get this from Starlette, which
cancels the body iterator on disconnect; ``within`` bounds a stream in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from snark.errors import RequestTimeout

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection; nobody is left to answer."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T], *, timeout_s: float) -> T:
    """Await ``work``; cancel it if the client disconnects or ``timeout_s`` passes (504)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # timed out, client gone, or our own caller cancelled: stop the row too
            task.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    if watcher in done:
        raise ClientDisconnected()
    raise _timed_out(timeout_s)


def _timed_out(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(
        f"The request took longer than {timeout_s:g} s (SNARK_REQUEST_TIMEOUT_S): ask for fewer tokens or retry later."
    )


async def within(events: AsyncIterator[T], timeout_s: float) -> AsyncIterator[T]:
    """Yield from ``events`` until ``timeout_s`` from now; then close it and raise ``RequestTimeout`` (504).

    The timeout covers each wait for the next item, never a ``yield``: a timeout left open across a
    yield would fire inside whatever the consumer happens to be doing (sending a chunk) instead.
    Cancelling the wait runs ``events``' own ``finally``, which is what stops the engine row.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                item = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _timed_out(timeout_s) from None
        yield item
