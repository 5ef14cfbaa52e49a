"""Shared fixtures: one tiny random-weight Qwen2.5-VL per session, a real engine, real HTTP.

The tiny checkpoint goes through the real builder and loader (real Qwen2 tokenizer, processor and
model code). Servers are real uvicorn instances on 127.0.0.1, driven by real HTTP clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub

from snark import cli  # noqa: E402
from snark.app import create_app  # noqa: E402
from snark.config import Settings, load_settings  # noqa: E402
from snark.engine.loader import load_model  # noqa: E402
from snark.engine.tiny_model import is_tiny_checkpoint  # noqa: E402
from snark.engine.transformers import TransformersEngine as Engine  # noqa: E402
from snark.serve import serve_in_thread as serve  # noqa: E402,F401  (a real uvicorn in a thread)
from snark.speech import build_speaker  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    # SNARK_TEST_TINY_DIR lets a developer reuse one build across runs; CI builds it fresh.
    target = os.environ.get("SNARK_TEST_TINY_DIR") or str(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))
    if not is_tiny_checkpoint(target):
        assert cli.main(["tiny-model", target]) == 0  # built the way a user builds it
    return target


def start_engine(model_dir: str, **options) -> Engine:
    engine = Engine(lambda: load_model(model_dir, device="cpu"), **options)
    engine.start()
    engine.wait_ready(120)
    return engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> Iterator[Engine]:
    engine = start_engine(tiny_model_dir, max_batch_size=8, batch_wait_ms=20)
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def test_settings(tiny_model_dir) -> Settings:
    # Loopback image URLs are how the tests serve images, hence allow_private_urls.
    return load_settings(vlm_model=tiny_model_dir, allow_private_urls=True, max_batch_size=8, batch_wait_ms=20)


@pytest.fixture(scope="session")
def speaker(test_settings):
    return build_speaker(test_settings)  # the real Piper joe voice, loaded on first use


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def base_url(test_settings, tiny_engine, speaker) -> Iterator[str]:
    """A server on the shared tiny engine, with default test settings."""
    with serve(create_app(test_settings, engine=tiny_engine, speaker=speaker)) as url:
        yield url


def hang_up_once(url: str, path: str, body: dict, running: Callable[[], object], timeout_s: float = 60.0) -> None:
    """POST ``body`` as a client that waits for a plain (non-streamed) answer, then close the connection
    once ``running()`` says the request is being generated: an event, not a timer, so a fast machine
    cannot finish the request before the client gives up."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(head + payload)
        deadline = time.monotonic() + timeout_s
        while not running():
            if time.monotonic() > deadline:
                raise AssertionError(f"the request to {path} never started running within {timeout_s} s")
            time.sleep(0.02)
        connection.setblocking(False)
        try:
            answered = connection.recv(1)  # nothing yet: the answer comes only when generation ends
        except BlockingIOError:
            answered = b""
        assert not answered, "the request ended before the client hung up"


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0, poll_s: float = 0.05):
    """``condition()``'s first true result, polled every ``poll_s``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)
    return result


@contextlib.contextmanager
def image_server(body: bytes, content_type: str, on_get: Callable[[str], None] | None = None) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering every GET with ``body``; yields its base URL.
    ``on_get(path)`` runs first in the handler thread (to count requests, or to hold the answer)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if on_get is not None:
                on_get(self.path)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
