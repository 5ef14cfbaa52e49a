"""Loading a hub id: one quick check of the hub, then the download, the cached copy, or the message.

Every hub here is a fake on 127.0.0.1 (``Hub(endpoint=...)``, or HF_ENDPOINT for the process test):
one that refuses connections, and one that answers 503 and counts what it is asked.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from snark.engine.hub import Hub, resolve_checkpoint
from snark.engine.loader import LARGE_ON_CPU_BYTES, TINY_MODEL_NAME, load_model, warn_if_large_on_cpu
from snark.errors import ConfigError
from tests.server_process import ServerProcess, assert_no_traceback

REPO = "snark-test/tiny"


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    """An address where nothing listens: connections are refused (the port stays bound, so no one else takes it)."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{reserved.getsockname()[1]}"


@contextlib.contextmanager
def failing_hub() -> Iterator[tuple[str, list[str]]]:
    """A hub that answers 503 to everything and records each request."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            asked.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()


def cache_holding(tiny_model_dir: str, cache_dir: Path) -> Path:
    """A hub cache (huggingface_hub's layout) holding the tiny checkpoint as REPO's main revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = cache_dir / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


def test_an_unreachable_hub_loads_the_cached_copy(tiny_model_dir, tmp_path, refusing_endpoint, caplog) -> None:
    snapshot = cache_holding(tiny_model_dir, tmp_path)
    hub = Hub(endpoint=refusing_endpoint, cache_dir=str(tmp_path), offline=False)
    with caplog.at_level(logging.WARNING, logger="snark.engine.hub"):
        assert resolve_checkpoint(REPO, hub) == snapshot
    assert [r.getMessage() for r in caplog.records] == [
        f"the hub at {refusing_endpoint} cannot be reached ([Errno 111] Connection refused): "
        f"loading the cached copy of {REPO}"
    ]
    loaded = load_model(REPO, device="cpu", hub=hub)  # the real load, from the cache, without the hub
    assert loaded.name == TINY_MODEL_NAME and loaded.is_tiny


def test_offline_mode_loads_the_cached_copy_without_asking(tiny_model_dir, tmp_path) -> None:
    snapshot = cache_holding(tiny_model_dir, tmp_path)
    with failing_hub() as (endpoint, asked):
        assert resolve_checkpoint(REPO, Hub(endpoint=endpoint, cache_dir=str(tmp_path), offline=True)) == snapshot
    assert asked == []


def test_an_unusable_hub_without_a_cached_copy_fails_after_one_request(tmp_path) -> None:
    with failing_hub() as (endpoint, asked), pytest.raises(ConfigError) as caught:
        resolve_checkpoint(
            "Qwen/Qwen2.5-VL-7B-Instruct", Hub(endpoint=endpoint, cache_dir=str(tmp_path), offline=False)
        )
    assert asked == ["HEAD /api/models/Qwen/Qwen2.5-VL-7B-Instruct"]  # one check, no retries
    message = str(caught.value)
    assert f"the Hugging Face hub at {endpoint} cannot be used (it answered 503)" in message
    assert "no copy in the cache" in message and "VLM_MODEL" in message and "snark serve --tiny" in message


def test_a_large_model_in_float32_on_cpu_is_warned_about_first(tmp_path, caplog) -> None:
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    with open(tmp_path / "model-00001-of-00001.safetensors", "wb") as weights:
        weights.truncate(LARGE_ON_CPU_BYTES // 2 + 1)  # sparse: the size counts, not the bytes
    with caplog.at_level(logging.WARNING, logger="snark.engine.loader"):
        warn_if_large_on_cpu("Qwen/Qwen2.5-VL-3B-Instruct", tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "about 4 GB of memory in float32 on CPU" in warning and "VLM_SIZE=3B" in warning and "--tiny" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snark.engine.loader"):
        (tmp_path / "model-00001-of-00001.safetensors").unlink()
        warn_if_large_on_cpu("Qwen/Qwen2.5-VL-3B-Instruct", tmp_path)
    assert caplog.records == []


def test_serve_with_an_unusable_hub_stops_at_once_and_says_each_thing_once(tmp_path) -> None:
    with failing_hub() as (endpoint, asked):
        env = {
            "VLM_MODEL": "Qwen/Qwen2.5-VL-7B-Instruct",
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path),
        }
        with ServerProcess(**env) as server:
            assert server.exit_code() == 1
    assert asked == ["HEAD /api/models/Qwen/Qwen2.5-VL-7B-Instruct"]
    log = server.log
    assert "snark: Cannot load 'Qwen/Qwen2.5-VL-7B-Instruct'" in log and "snark serve --tiny" in log
    said = [line for line in server.lines if line.startswith(("WARNING", "ERROR"))]
    assert said and len(said) == len(set(said)), said  # each warning and error once
    assert_no_traceback(log)
