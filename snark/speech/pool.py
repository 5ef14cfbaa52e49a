"""The synthesis pool: a few worker threads every spoken reply and speech request share.

Each sentence is one job, so a long reply never holds a worker for more than one sentence at a time
and a short request started meanwhile gets the next free worker instead of waiting for the whole
reply. Jobs run off the event loop; a job not yet started is dropped when its caller goes away.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from snark.speech.base import Speaker


def default_workers() -> int:
    """Half the cores (the model needs the rest), at least two so one long reply never starves a
    short request, at most eight."""
    return min(8, max(2, (os.cpu_count() or 2) // 2))


class SynthesisPool:
    """``speak(speaker, sentence)`` -> its PCM, in one of ``workers`` threads.

    ``on_spoken(synthesis_s, audio_s)`` runs in the worker after each job: the real-time factor of
    synthesis is ``synthesis_s / audio_s``.
    """

    def __init__(self, workers: int, *, on_spoken: Callable[[float, float], None] | None = None) -> None:
        if workers < 1:
            raise ValueError("a synthesis pool needs at least one worker")
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snark-tts")
        self._on_spoken = on_spoken
        self._busy = threading.Condition()
        self._running = 0  # jobs inside a worker right now

    async def speak(self, speaker: Speaker, text: str, *, speed: float = 1.0) -> bytes:
        """All PCM for ``text`` (one sentence, usually). Cancelling before a worker took the job
        drops it; a job already running finishes its sentence and is thrown away."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._synthesize, speaker, text, speed)

    def _synthesize(self, speaker: Speaker, text: str, speed: float) -> bytes:
        with self._busy:
            self._running += 1
        try:
            started = time.perf_counter()
            pcm = b"".join(speaker.synthesize(text, speed=speed))
            if self._on_spoken is not None and pcm:
                self._on_spoken(time.perf_counter() - started, len(pcm) / 2 / speaker.sample_rate)
            return pcm
        finally:
            with self._busy:
                self._running -= 1
                self._busy.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job is running (jobs still queued may start later); False on timeout."""
        with self._busy:
            return self._busy.wait_for(lambda: self._running == 0, timeout_s)

    def close(self, *, wait: bool = False) -> None:
        """Drop the jobs not yet started; ``wait`` for the running ones to finish."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
