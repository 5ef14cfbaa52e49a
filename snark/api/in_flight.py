"""The requests in flight, so that a stop can end each one properly once its grace period is over.

A stop first lets running requests finish (``snark serve`` drains for ``SNARK_SHUTDOWN_GRACE_S``).
What is still running then ends in two ways:

* generations are stopped by the engine: their rows end as a shutdown, so a chat stream sends its
  error event and ``data: [DONE]``, a form stream its closing line, a plain request its 503;
* everything the engine cannot end (a request whose response has not started, an audio stream still
  being spoken) is cancelled here: the first gets a 503, the second a properly closed body (a player
  stops where the audio stops), never a reset connection or a traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snark.api.errors import error_response
from snark.engine.base import SHUTTING_DOWN, Engine
from snark.errors import ShuttingDown

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Exchange:
    """One HTTP request and its response, as far as they went."""

    task: asyncio.Task
    response_started: bool = False
    audio: bool = False  # the response is an audio stream (its content type is audio/*)
    complete: bool = False  # the last body message went out
    cut: bool = False  # cancelled by ``InFlight.cut``: end it properly, do not propagate

    @property
    def engine_ends_it(self) -> bool:
        """A started text response (JSON, SSE, plain-text stream): the engine's shutdown ends it."""
        return self.response_started and not self.audio


@dataclass
class InFlight:
    exchanges: set[Exchange] = field(default_factory=set)

    def __len__(self) -> int:
        return sum(1 for exchange in self.exchanges if not exchange.complete)

    def cut(self) -> int:
        """Cancel every exchange the engine does not end itself; each then ends properly. Returns how many."""
        cut = [e for e in self.exchanges if not e.complete and not e.cut and not e.engine_ends_it]
        for exchange in cut:
            exchange.cut = True
            exchange.task.cancel()
        return len(cut)


async def end_in_flight(engine: Engine, in_flight: InFlight) -> None:
    """The grace period is over: stop the engine's rows (streams end as a shutdown), then cut the rest."""
    await asyncio.to_thread(engine.stop)
    in_flight.cut()


class TrackInFlight:
    """ASGI middleware keeping ``in_flight`` current, and ending exchanges that ``InFlight.cut`` cancelled."""

    def __init__(self, app: ASGIApp, *, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        exchange = Exchange(task)

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.response_started = True
                headers = dict(message.get("headers", ()))
                exchange.audio = headers.get(b"content-type", b"").startswith(b"audio/")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        self.in_flight.exchanges.add(exchange)
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not exchange.cut:
                raise
            task.uncancel()  # our own cancellation, handled here: the task goes on to answer
            await _end_cut(exchange, scope, receive, send)
        finally:
            self.in_flight.exchanges.discard(exchange)


async def _end_cut(exchange: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    if exchange.complete:
        return
    if not exchange.response_started:
        await error_response(ShuttingDown(SHUTTING_DOWN))(scope, receive, send)
        return
    log.info("an audio stream ended early: the server is shutting down")
    await send({"type": "http.response.body", "body": b"", "more_body": False})
