"""A generation request as a small typed object with an explicit state.

The HTTP layer builds a ``GenerationRequest`` (prompt + sampling parameters), the engine's worker
thread moves it through ``RequestState`` and pushes ``StreamEvent``s back to the event loop that
created it. Timestamps are ``time.perf_counter()`` seconds and feed the JSON ``timing`` field and the
metrics.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from snark.values import FinishReason, SamplingParams, TokenLogprob


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, not yet in a batch
    RUNNING = "running"  # its row is in the batch being generated
    FINISHED = "finished"  # stop / length
    CANCELLED = "cancelled"  # the client went away or the request timed out
    FAILED = "failed"  # the batch raised; the error went to the client


@dataclass
class PromptInputs:
    """One request's processor output, before batching (no padding yet)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [patches, channels * temporal * patch * patch]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    # Per image: a digest of its content and processed size (``image_inputs.py``). The engine keys
    # its vision-output and prefix caches by it, so different images never share cached work.
    image_keys: tuple[bytes, ...] = ()
    pixel_values_videos: torch.Tensor | None = None  # [patches, channels * temporal * patch * patch]
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]: frame pairs, height and width in patches
    second_per_grid_ts: tuple[float, ...] = ()  # per video: seconds one frame pair spans (M-RoPE time)
    video_keys: tuple[bytes, ...] = ()  # per video: a digest of its source and sampling, as image_keys
    cache_salt: str | None = None  # requests with different salts share no cached prefix (vLLM's field)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def num_videos(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.shape[0])


@dataclass
class StreamEvent:
    """What the worker thread sends to the client: a text delta, then one final event."""

    text: str = ""
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind ``text`` (with SamplingParams.logprobs)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


_ids = itertools.count(1)


class Outbox:
    """One decoding step's events for all rows, delivered with one wake-up per event loop rather
    than one per row: fewer thread switches while the model waits to run its next step."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[StreamEvent], StreamEvent]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[StreamEvent], event: StreamEvent) -> None:
        self._by_loop.setdefault(loop, []).append((queue, event))

    def flush(self) -> None:
        """Deliver, in the order added. Call from the generation thread once the step is done."""
        by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue[StreamEvent], StreamEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


@dataclass(eq=False)
class GenerationRequest:
    prompt: PromptInputs
    params: SamplingParams
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    text: str = ""  # the full answer, filled in as deltas are sent
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first)
    arrived_at: float = field(default_factory=time.perf_counter)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # False for callers that only want the whole answer: text deltas then stay in the worker thread
    # (accumulated in ``text``) and the event loop wakes once, for the final event, not once per token.
    deliver_deltas: bool = True
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _loop_thread: int | None = field(default=None, repr=False)  # the thread that runs ``_loop``
    _events: asyncio.Queue[StreamEvent] | None = field(default=None, repr=False)

    def bind_to_running_loop(self) -> None:
        """Attach the caller's event loop: events are delivered there, thread-safely."""
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._loop_thread = threading.get_ident()

    # --- called from the generation thread ------------------------------------------------------
    def push(self, event: StreamEvent, outbox: Outbox | None = None) -> None:
        """Send ``event`` to the client now, or with the rest of a decoding step's events (``outbox``)."""
        if event.text:
            self.text += event.text
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if self._loop is None or self._events is None or (not self.deliver_deltas and not event.is_final):
            return
        if threading.get_ident() == self._loop_thread:  # an engine on the caller's own loop (vLLM's)
            self._events.put_nowait(event)
            return
        if outbox is not None:
            outbox.add(self._loop, self._events, event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass

    def finish(self, reason: FinishReason, outbox: Outbox | None = None) -> None:
        self.finish_reason = reason
        self.state = RequestState.CANCELLED if reason is FinishReason.CANCELLED else RequestState.FINISHED
        self.finished_at = time.perf_counter()
        self.push(StreamEvent(finish_reason=reason), outbox)

    def fail(self, error: BaseException) -> None:
        self.state = RequestState.FAILED
        self.finished_at = time.perf_counter()
        self.push(StreamEvent(error=error))

    def drop(self) -> None:
        """Leave the waiting list without running: cancelled before a batch took it."""
        self.state = RequestState.CANCELLED
        self.finished_at = time.perf_counter()

    # --- called from anywhere -----------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this row at its next decoding step (or never start it)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def is_done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)

    # --- called from the event loop -----------------------------------------------------------
    async def events(self) -> AsyncIterator[StreamEvent]:
        """Yield events until the final one; raises the engine's error if the step failed.

        Text events that are already queued when the consumer asks come out merged into one: a
        consumer that fell behind (a busy event loop, a slow client) catches up with one SSE chunk
        and one socket write for several tokens instead of one each."""
        if self._events is None:
            raise RuntimeError("bind_to_running_loop() was not called")
        while True:
            event = await self._events.get()
            while not event.is_final and not self._events.empty():
                queued = self._events.get_nowait()
                if queued.error is not None:
                    if event.text:
                        yield event
                    event = queued
                    break
                event = StreamEvent(
                    text=event.text + queued.text,
                    finish_reason=queued.finish_reason,
                    logprobs=event.logprobs + queued.logprobs,
                )
            if event.error is not None:
                raise event.error
            yield event
            if event.is_final:
                return

    @property
    def queue_s(self) -> float:
        return (self.scheduled_at or self.arrived_at) - self.arrived_at

    @property
    def generate_s(self) -> float:
        if self.scheduled_at is None:
            return 0.0
        return (self.finished_at or time.perf_counter()) - self.scheduled_at
