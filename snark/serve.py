"""uvicorn as ``snark serve`` runs it: the port bound first, stop signals drain, then end what is left;
a second one exits.

``snark serve`` binds its port before anything slow happens and hands the socket to uvicorn: a port
already in use is a message in a second, not a model loaded for nothing and a bind error afterwards
(uvicorn alone binds only once the app has started).

    first SIGTERM / Ctrl-C ──► no new connections; requests in flight go on for SNARK_SHUTDOWN_GRACE_S
                               ──► then the engine stops their rows and the rest is cut (each ends properly)
                               ──► lifespan shutdown, exit 0, no traceback
    Ctrl-C again, a second or more later ──► exit at once (130)

uvicorn alone waits for every request with no limit, exits 130 with a ``KeyboardInterrupt``
traceback after Ctrl-C (it re-raises the signal), and treats any second SIGINT as "quit now".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from enum import Enum
from typing import TYPE_CHECKING

import uvicorn

from snark.errors import ConfigError

if TYPE_CHECKING:
    from snark.config import Settings

log = logging.getLogger("snark.serve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A repeat of the stop within this long is the same stop: `uv run` relays a process group's SIGINT to
# its child 200 ms after the group got it, and systemd signals every process of a service's group.
REPEAT_WINDOW_S = 1.0


class SignalAction(Enum):
    DRAIN = "drain"
    IGNORE = "ignore"
    EXIT_NOW = "exit now"


class StopSignals:
    """What each stop signal means: the first drains; only a Ctrl-C (SIGINT) a second or more after the
    first exits at once. Repeated SIGTERMs never do: supervisors send SIGKILL when their own patience ends."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def on_signal(self, sig: int, now: float) -> SignalAction:
        if self.first_at is None:
            self.first_at = now
            return SignalAction.DRAIN
        if sig == signal.SIGINT and now - self.first_at >= REPEAT_WINDOW_S:
            return SignalAction.EXIT_NOW
        return SignalAction.IGNORE


def exit_now(code: int) -> None:
    """Leave the process without waiting for anything (threads still loading a model or downloading
    weights included); log lines and output written so far are flushed first."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class SnarkServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        grace_s: float,
        in_flight: Callable[[], int],
        end_in_flight: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.in_flight = in_flight  # how many requests are in flight now
        self.end_in_flight = end_in_flight  # stops the engine's rows and cuts the rest
        self.signals = StopSignals()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's, without raising the signal again once the server stopped (the traceback and the
        # exit status 130 after a clean Ctrl-C).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        action = self.signals.on_signal(sig, time.monotonic())
        name = signal.Signals(sig).name
        if action is SignalAction.EXIT_NOW:
            log.warning("%s again: stopping at once (%s cut)", name, _requests(self.in_flight()))
            exit_now(128 + sig)
        if action is SignalAction.IGNORE:
            self._from_signal(log.info, "%s: already stopping", name)
            return
        self.should_exit = True
        self._from_signal(self._announce_stop, name)

    def _from_signal(self, function: Callable, *args) -> None:
        # A signal handler runs between two bytecodes of the event loop's own code: logging and timers
        # wait for the loop's next turn.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _announce_stop(self, name: str) -> None:
        running = self.in_flight()
        if running:
            log.info(
                "%s: stopping; %s in flight get up to %g s to finish (SNARK_SHUTDOWN_GRACE_S), then are cancelled",
                name,
                _requests(running),
                self.grace_s,
            )
            self._loop.call_later(REPEAT_WINDOW_S, self._offer_exit_now)
        else:
            log.info("%s: stopping", name)

    def _offer_exit_now(self) -> None:
        if running := self.in_flight():
            log.info("still finishing %s: press Ctrl-C again to stop at once", _requests(running))

    async def shutdown(self, sockets=None) -> None:
        ending = asyncio.ensure_future(self._end_in_flight_after_grace())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ending.cancel()

    async def _end_in_flight_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        log.warning(
            "SNARK_SHUTDOWN_GRACE_S=%g s is over: cancelling %s still in flight",
            self.grace_s,
            _requests(self.in_flight()),
        )
        await self.end_in_flight()


def _requests(count: int) -> str:
    return f"{count} request" if count == 1 else f"{count} requests"


class StopBeforeServing(Exception):
    """A stop signal arrived before the server started (building the tiny model, building the app)."""


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Until uvicorn takes the signals over: a stop signal interrupts what the main thread does."""

    def interrupt(sig: int, frame) -> None:
        raise StopBeforeServing(signal.Signals(sig).name)

    original = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def serve(settings: Settings, listener: socket.socket, *, tiny: bool) -> int:
    """Serve on ``listener`` until stopped. 0: a clean stop; 1: the model could not load."""
    from snark.api.in_flight import end_in_flight
    from snark.app import create_app
    from snark.engine.tiny_model import ensure_tiny_model
    from snark.logs import configure_logging

    configure_logging(settings)
    server: SnarkServer | None = None

    def stop_serving(exc: BaseException) -> None:  # the model failed to load: leave run() below
        if server is not None:
            server.should_exit = True

    try:
        with stop_signals_raise():
            if tiny:
                tiny_dir = ensure_tiny_model(settings.tiny_dir)
                settings = settings.model_copy(update={"vlm_model": str(tiny_dir)})
                log.info("serving the tiny random-weight test model from %s (answers are noise)", tiny_dir)
            app = create_app(settings, on_load_failed=stop_serving)
            engine, in_flight = app.state.snark.engine, app.state.in_flight
            server = SnarkServer(
                uvicorn.Config(app, log_level="info"),
                grace_s=settings.shutdown_grace_s,
                in_flight=in_flight.__len__,
                end_in_flight=lambda: end_in_flight(engine, in_flight),
            )
            log.info("listening on http://%s:%d", *listener.getsockname()[:2])
            server.run(sockets=[listener])
    except StopBeforeServing as stop:
        log.info("%s: stopped before the server started", stop)
        return 0
    if engine.load_error is not None:
        print(f"snark: {engine.load_error}", file=sys.stderr)
        return 1
    if engine.facts is None:
        # Stopped while the model was loading: the load goes on in threads (downloads among them) that
        # the interpreter would wait for at exit. Nothing of it is needed any more.
        log.info("stopped before the model finished loading")
        exit_now(0)
    return 0


# --- the listening socket -----------------------------------------------------------------------

_HOW = "pick another with --port or SNARK_PORT"


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``; connections wait in its backlog until uvicorn accepts
    them. Raises ``ConfigError`` naming the flag and the environment variable to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"Cannot listen on host {host!r} ({exc.strerror}): set --host or SNARK_HOST to an address of this "
            "machine (127.0.0.1 for this machine only, 0.0.0.0 for every interface)."
        ) from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may reuse the port while old connections linger in TIME_WAIT
    # (a port another process listens on stays refused).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen()  # now: two sockets with SO_REUSEADDR may both bind a port nobody listens on yet
    except OSError as exc:
        sock.close()
        raise ConfigError(_bind_problem(host, port, exc)) from None
    return sock


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"Port {port} on {host} is already in use (another Snark, or another server, listens there): "
            f"stop it, or {_HOW}."
        )
    if exc.errno == errno.EACCES:
        return f"Port {port} needs privileges this process lacks: {_HOW} (above 1023)."
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host} is not an address of this machine: set --host or SNARK_HOST "
            "(127.0.0.1, or 0.0.0.0 for every interface)."
        )
    return f"Cannot listen on {host}:{port} ({exc.strerror}): check --host/--port or SNARK_HOST/SNARK_PORT."


# --- in a thread ----------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """``app`` under a real uvicorn on 127.0.0.1 in a thread of this process (tests, the benchmark's
    in-process runs); yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="snark-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
