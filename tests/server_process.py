"""A real ``snark serve`` in its own process (and process group), with its log read as it is written.

Each start costs 10-20 s on 2 cores (imports, the model load, the warm-up), so tests group their
checks on one process. Nothing sleeps to wait: every wait is for a log line or an answer, with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx

from tests.conftest import free_port


class ServerProcess:
    def __init__(self, *args: str, **env: str) -> None:
        self.port = free_port()
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "SNARK_PORT": str(self.port), **env}
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "snark.cli", "serve", *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal gives a foreground job
        )
        self.lines: list[str] = []
        self._ended = False  # the process closed its output
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float = 60.0, after: int = 0) -> re.Match:
        """The first log line (from line ``after`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := regex.search(line):
                        return match
                if self._ended:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
        raise AssertionError(f"no log line matched {pattern!r} within {timeout_s} s; the log:\n{self.log[-4000:]}")

    def wait_until(self, condition: Callable[[], object], what: str, timeout_s: float = 90.0):
        deadline = time.monotonic() + timeout_s
        while not (result := condition()):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the server exited ({self.process.returncode}) waiting for {what}:\n{self.log[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}:\n{self.log[-4000:]}")
            time.sleep(0.05)
        return result

    def wait_ready(self) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_until(healthy, "GET /health to answer 200")

    def signal_group(self, sig: int) -> None:
        """What a terminal does on Ctrl-C: the signal goes to every process of the group."""
        os.killpg(self.process.pid, sig)

    def exit_code(self, timeout_s: float = 60.0) -> int:
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def assert_no_traceback(log: str) -> None:
    for sign in ("Traceback", "Exception in ASGI application", "CancelledError", "KeyboardInterrupt"):
        assert sign not in log, f"{sign!r} in the server log:\n{log[-4000:]}"
