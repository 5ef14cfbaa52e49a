"""Stopping ``snark serve``: signals drain requests in flight for SNARK_SHUTDOWN_GRACE_S, then end what
is left properly; a second Ctrl-C exits at once; a signal during the model load stops it.

The process tests run real servers (each start costs 10-20 s), so each one checks several things.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from snark.serve import REPEAT_WINDOW_S, SignalAction, StopSignals
from tests.conftest import image_server
from tests.server_process import ServerProcess, assert_no_traceback

SAMPLE = Path(__file__).resolve().parents[2] / "sample.jpeg"
LONG = 2000  # tokens: about a minute on the tiny model on CPU, far past the grace periods below
# Far more audio than socket buffers hold (4096 characters at a quarter speed): a speech stream whose
# client does not read cannot finish on its own.
LONG_SPEECH = {"model": "tts-1", "input": ("This sentence is spoken slowly. " * 128)[:4096], "speed": 0.25}


def test_the_first_signal_drains_and_only_a_later_ctrl_c_exits_at_once() -> None:
    signals = StopSignals()
    assert signals.on_signal(signal.SIGTERM, now=100.0) is SignalAction.DRAIN
    # uv run relays a group's SIGINT 200 ms later; systemd signals every process of the service.
    assert signals.on_signal(signal.SIGINT, now=100.2) is SignalAction.IGNORE
    assert signals.on_signal(signal.SIGTERM, now=100.3) is SignalAction.IGNORE
    assert signals.on_signal(signal.SIGTERM, now=100.0 + 5 * REPEAT_WINDOW_S) is SignalAction.IGNORE
    assert signals.on_signal(signal.SIGINT, now=100.0 + REPEAT_WINDOW_S) is SignalAction.EXIT_NOW


@contextlib.contextmanager
def held_image() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """An image URL whose answer waits until the test releases it: a request stays in flight on it."""
    asked, release = threading.Event(), threading.Event()

    def hold(path: str) -> None:
        asked.set()
        release.wait(60)

    with image_server(SAMPLE.read_bytes(), "image/jpeg", on_get=hold) as url:
        try:
            yield f"{url}/sample.jpeg", asked, release
        finally:
            release.set()  # before the server shuts down: a held answer must not keep it waiting


def next_text(lines: Iterator[str]) -> str:
    for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            return line
    raise AssertionError("the stream ended without content")


def chat_body(max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


def test_ctrl_c_drains_in_flight_requests_then_ends_every_stream_properly(tiny_model_dir: str) -> None:
    env = {"VLM_MODEL": tiny_model_dir, "SNARK_SHUTDOWN_GRACE_S": "8", "SNARK_ALLOW_PRIVATE_URLS": "1"}
    with ServerProcess(**env) as server, held_image() as (image_url, asked, release), contextlib.ExitStack() as streams:
        server.wait_ready()
        http = streams.enter_context(httpx.Client(base_url=server.url, timeout=60))
        for _ in range(3):
            assert http.get("/health").status_code == 200  # probes: left out of the access log

        sse = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=chat_body(LONG)))
        sse_lines = sse.iter_lines()
        next_text(sse_lines)
        form = streams.enter_context(
            http.stream("POST", "/infer/text", data={"prompt": "Hi", "max_new_tokens": str(LONG), "stream": "true"})
        )
        form_text = form.iter_text()
        assert next(form_text)
        spoken = streams.enter_context(
            http.stream(
                "POST", "/infer/text", data={"prompt": "Hi", "max_new_tokens": str(LONG), "response_format": "wav"}
            )
        )
        assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/wav"
        speech = streams.enter_context(
            http.stream("POST", "/v1/audio/speech", json={**LONG_SPEECH, "response_format": "pcm"})
        )
        assert speech.status_code == 200 and speech.headers["content-type"] == "audio/pcm"
        drained: dict = {}

        def ask_about_the_held_image() -> None:
            response = httpx.post(
                f"{server.url}/infer/image",
                data={"prompt": "What is this?", "max_new_tokens": "4", "image_url": image_url},
                timeout=60,
            )
            drained["status"], drained["body"] = response.status_code, response.json()

        waiting = threading.Thread(target=ask_about_the_held_image)
        waiting.start()
        assert asked.wait(30), "the server never fetched the image"

        mark = len(server.lines)
        server.signal_group(signal.SIGINT)
        stopping = server.wait_for_line(r"SIGINT: stopping; (\d+) requests in flight", after=mark)
        assert stopping.group(1) == "5"  # the chat, form and spoken streams, the speech, the image request
        server.wait_for_line(r"Waiting for connections to close", after=mark)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(f"{server.url}/health", timeout=5)

        release.set()  # the request in flight goes on, and is answered in full
        waiting.join(60)
        assert drained["status"] == 200, drained
        assert drained["body"]["finish_reason"] in ("stop", "length")
        assert next_text(sse_lines)  # the long streams still run

        over = server.wait_for_line(r"SNARK_SHUTDOWN_GRACE_S=8 s is over: cancelling (\d+) requests", after=mark)
        assert over.group(1) == "4"
        rest = [line for line in sse_lines if line]
        assert '"code":"shutting_down"' in rest[-2] and "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert "".join(form_text).endswith(
            "[snark error: The server is shutting down and stopped this request; retry it.]\n"
        )
        wav = b"".join(spoken.iter_bytes())  # a clean end of the body: no protocol error while reading
        assert wav[:4] == b"RIFF"
        pcm = b"".join(speech.iter_bytes())
        assert len(pcm) > 0 and len(pcm) % 2 == 0

        assert server.exit_code() == 0
    log = server.log
    assert_no_traceback(log)
    assert "POST /v1/chat/completions" in log and "GET /health" not in log
    assert "Loading weights: 100%" in log and "\r" not in log  # progress as lines, not a redrawn bar


def test_sigterm_drains_and_a_later_ctrl_c_exits_at_once(tiny_model_dir: str) -> None:
    with ServerProcess(VLM_MODEL=tiny_model_dir, SNARK_SHUTDOWN_GRACE_S="600") as server:
        server.wait_ready()
        with (
            httpx.Client(base_url=server.url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=chat_body(LONG)) as sse,
        ):
            lines = sse.iter_lines()
            next_text(lines)
            mark = len(server.lines)
            server.process.send_signal(signal.SIGTERM)  # what a supervisor sends (to the process alone)
            server.wait_for_line(r"SIGTERM: stopping; 1 request in flight", after=mark)
            next_text(lines)  # draining: the stream goes on
            server.wait_for_line(r"press Ctrl-C again to stop at once", after=mark)
            next_text(lines)
            server.process.send_signal(signal.SIGINT)
            assert server.exit_code() == 128 + signal.SIGINT
    assert "SIGINT again: stopping at once" in server.log
    assert_no_traceback(server.log)


@contextlib.contextmanager
def silent_hub() -> Iterator[tuple[str, threading.Event]]:
    """A hub on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connected = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])
                connected.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", connected
    finally:
        listener.close()
        for connection in held:
            connection.close()


def test_a_signal_while_the_model_loads_stops_the_load(tmp_path) -> None:
    with silent_hub() as (endpoint, connected):
        env = {
            "VLM_MODEL": "snark-test/never-answered",
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path),
        }
        with ServerProcess(**env) as server:
            assert connected.wait(60), "the server never asked the hub"
            server.wait_until(
                lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 503, "/health to say loading"
            )
            server.process.send_signal(signal.SIGTERM)
            # The hub never answers: had the stop waited for the load, the hub check would fail first.
            assert server.exit_code() == 0
    assert "stopped before the model finished loading" in server.log
    assert "Cannot load" not in server.log
    assert_no_traceback(server.log)
