"""The synthesis pool: a few worker threads every spoken reply and speech request share.

Each sentence is one job, so a long reply never holds a worker for more than one sentence at a time.
Workers take the job whose audio is needed soonest (earliest deadline first): a reply whose listener
is about to run out of audio goes before one that has seconds buffered, and a new request's first
sentence (needed now) goes before the run-ahead of replies already playing. Jobs run off the event
loop; a job not yet started is dropped when its caller goes away.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from snark.speech.base import Speaker


def default_workers() -> int:
    """Half the cores (the model needs the rest), at least two so one long reply never starves a
    short request, at most eight."""
    return min(8, max(2, (os.cpu_count() or 2) // 2))


class SynthesisPool:
    """``await speak(speaker, sentence, due_at=...)`` -> its PCM, in one of ``workers`` threads.

    ``on_spoken(synthesis_s, audio_s)`` runs in the worker after each job: the real-time factor of
    synthesis is ``synthesis_s / audio_s``.
    """

    def __init__(self, workers: int, *, on_spoken: Callable[[float, float], None] | None = None) -> None:
        if workers < 1:
            raise ValueError("a synthesis pool needs at least one worker")
        self.workers = workers
        self._on_spoken = on_spoken
        self._jobs: list[tuple[float, int, Future, Speaker, str, float]] = []  # a heap by (due_at, arrival)
        self._arrivals = itertools.count()
        self._changed = threading.Condition()
        self._running = 0  # jobs inside a worker right now
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def speak(self, speaker: Speaker, text: str, *, speed: float = 1.0, due_at: float | None = None) -> bytes:
        """All PCM for ``text`` (one sentence, usually). ``due_at`` (``time.perf_counter()`` clock) is
        when its listener needs it; default now. Cancelling before a worker took the job drops it; a
        job already running finishes its sentence and is thrown away."""
        future: Future[bytes] = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the synthesis pool is closed")
            self._start_workers()
            due = time.perf_counter() if due_at is None else due_at
            heapq.heappush(self._jobs, (due, next(self._arrivals), future, speaker, text, speed))
            self._changed.notify()
        return await asyncio.wrap_future(future)

    def _start_workers(self) -> None:
        while len(self._threads) < self.workers:  # lazily: an app that never speaks starts no thread
            thread = threading.Thread(target=self._work, name=f"snark-tts-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return
                _, _, future, speaker, text, speed = heapq.heappop(self._jobs)
                if not future.set_running_or_notify_cancel():
                    self._changed.notify_all()  # wait_idle may be waiting for this job to leave
                    continue  # its caller left before it started
                self._running += 1
            try:
                future.set_result(self._synthesize(speaker, text, speed))
            except BaseException as exc:  # delivered to the awaiting request, which reports it
                future.set_exception(exc)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()

    def _synthesize(self, speaker: Speaker, text: str, speed: float) -> bytes:
        started = time.perf_counter()
        pcm = b"".join(speaker.synthesize(text, speed=speed))
        if self._on_spoken is not None and pcm:
            self._on_spoken(time.perf_counter() - started, len(pcm) / 2 / speaker.sample_rate)
        return pcm

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job is running or queued; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._running == 0 and not self._jobs, timeout_s)

    def close(self, *, wait: bool = False) -> None:
        """Drop the jobs not yet started; ``wait`` for the running ones to finish."""
        with self._changed:
            self._closed = True
            for job in self._jobs:
                job[2].cancel()
            self._jobs.clear()
            self._changed.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
