"""The curl-facing form endpoints over real HTTP, on the tiny model and the real Piper voice."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import threading
import wave
from pathlib import Path

import httpx
import pytest

from snark.app import create_app
from snark.engine.loader import load_model
from snark.engine.transformers import TransformersEngine as Engine
from snark.speech import LazySpeaker
from snark.speech.piper_engine import PiperSpeaker
from tests.conftest import image_server as serve_image
from tests.conftest import serve

SAMPLE = Path(__file__).resolve().parents[2] / "sample.jpeg"


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def image_server():
    """Serves sample.jpeg on 127.0.0.1 and counts the requests it gets."""
    hits: list[str] = []
    with serve_image(SAMPLE.read_bytes(), "image/jpeg", on_get=hits.append) as url:
        yield url, hits


def ask(http, path="/infer/text", files=None, **fields):
    data = {"max_new_tokens": "8", **{k: str(v) for k, v in fields.items()}}
    return http.post(path, data=data, files=files)


def assert_error(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"]
    return error


def test_health_reports_the_tiny_model(http):
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["tiny_random_weights"] is True
    assert body["model"] == "snark-tiny-random-qwen2.5-vl" and "noise" in body["note"]


def test_text_json_reply(http):
    response = ask(http, prompt="Name three colours.", max_new_tokens=12)
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"text", "model", "usage", "timing"}
    assert body["model"] == "snark-tiny-random-qwen2.5-vl"
    assert body["usage"]["prompt_tokens"] > 10 and 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["timing"]["queue_s"] >= 0 and body["timing"]["generate_s"] > 0
    assert ask(http, prompt="Name three colours.", max_new_tokens=12).json()["text"] == body["text"]  # greedy


def test_text_reply_and_system_prompt(http):
    json_text = ask(http, prompt="Hi").json()
    plain = ask(http, prompt="Hi", response_format="text")
    assert plain.headers["content-type"].startswith("text/plain") and plain.text == json_text["text"]
    with_system = ask(http, prompt="Hi", system="You are a pirate.").json()
    assert with_system["usage"]["prompt_tokens"] != json_text["usage"]["prompt_tokens"]


def test_stream_sends_the_same_text_in_chunks(http):
    whole = ask(http, prompt="Count to five.", max_new_tokens=16).json()["text"]
    with http.stream(
        "POST", "/infer/text", data={"prompt": "Count to five.", "max_new_tokens": "16", "stream": "true"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        chunks = list(r.iter_text())
    assert "".join(chunks) == whole


def test_concurrent_requests_equal_serial_ones(http):
    prompts = [f"Story number {i}" + " again" * i for i in range(6)]
    serial = [ask(http, prompt=p, max_new_tokens=10).json()["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(lambda p: ask(http, prompt=p, max_new_tokens=10).json()["text"], prompts))
    assert batched == serial


def test_image_upload_url_and_data_uri_agree(http, image_server):
    url, hits = image_server
    upload = ask(
        http,
        "/infer/image",
        files={"image_file": ("sample.jpeg", SAMPLE.read_bytes(), "image/jpeg")},
        prompt="What is this?",
    )
    assert upload.status_code == 200, upload.text
    by_url = ask(http, "/infer/image", prompt="What is this?", image_url=f"{url}/sample.jpeg")
    data_uri = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    by_data = ask(http, "/infer/image", prompt="What is this?", image_url=data_uri)
    assert hits == ["/sample.jpeg"]
    assert upload.json() | {"timing": None} == by_url.json() | {"timing": None} == by_data.json() | {"timing": None}
    text_only = ask(http, prompt="What is this?").json()
    assert upload.json()["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 50  # image tokens


def test_request_can_lower_the_image_cap(http):
    files = {"image_file": ("sample.jpeg", SAMPLE.read_bytes(), "image/jpeg")}
    full = ask(http, "/infer/image", files=files, prompt="x").json()["usage"]["prompt_tokens"]
    low = ask(http, "/infer/image", files=files, prompt="x", max_image_pixels=16 * 28 * 28).json()
    assert low["usage"]["prompt_tokens"] < full
    too_high = ask(http, "/infer/image", files=files, prompt="x", max_image_pixels=10**9)
    assert_error(too_high, 400, "SNARK_MAX_IMAGE_PIXELS")


def test_bad_form_input_is_a_clear_400(http):
    assert_error(http.post("/infer/text", data={}), 400, "prompt")
    assert_error(ask(http, prompt="x", max_new_tokens="many"), 400, "max_new_tokens")
    assert_error(ask(http, prompt="x", max_new_tokens=10**6), 400, "SNARK_MAX_NEW_TOKENS_LIMIT")
    assert_error(ask(http, prompt="x", response_format="mp3"), 400, "response_format")
    assert_error(ask(http, prompt="x", temperature=5), 400, "temperature")
    assert_error(ask(http, prompt="x", response_format="wav", speed=9), 400, "speed")
    assert_error(ask(http, prompt="x", response_format="pcm", voice="nobody"), 400, "SNARK_TTS_VOICES")


def test_bad_images_are_refused(http):
    assert_error(ask(http, "/infer/image", prompt="x"), 400, "exactly one of image_url")
    both = ask(
        http,
        "/infer/image",
        prompt="x",
        image_url="http://example.invalid/a.png",
        files={"image_file": ("a.jpeg", SAMPLE.read_bytes(), "image/jpeg")},
    )
    assert_error(both, 400, "exactly one of image_url")
    assert_error(ask(http, "/infer/image", prompt="x", image_url="file:///etc/passwd"), 400, "http, https and data:")
    not_image = ask(http, "/infer/image", prompt="x", files={"image_file": ("notes.txt", b"hello", "text/plain")})
    assert_error(not_image, 400, "not an image")
    truncated = ask(
        http, "/infer/image", prompt="x", files={"image_file": ("cut.jpeg", SAMPLE.read_bytes()[:2000], "image/jpeg")}
    )
    assert truncated.status_code == 400


def test_limits_and_private_urls(test_settings, tiny_engine, speaker, image_server):
    url, hits = image_server
    strict = test_settings.model_copy(update={"allow_private_urls": False, "max_image_bytes": 10_000})
    seen = len(hits)
    with (
        serve(create_app(strict, engine=tiny_engine, speaker=speaker)) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        big = ask(http, "/infer/image", prompt="x", files={"image_file": ("s.jpeg", SAMPLE.read_bytes(), "image/jpeg")})
        assert_error(big, 413, "SNARK_MAX_IMAGE_BYTES")
        private = ask(http, "/infer/image", prompt="x", image_url=f"{url}/sample.jpeg")
        assert_error(private, 400, "SNARK_ALLOW_PRIVATE_URLS")
    assert len(hits) == seen  # the refused URL was never fetched


def test_wav_reply_loads_the_voice_once(test_settings, tiny_engine):
    loads = []

    def piper():
        loads.append(1)
        return PiperSpeaker()

    speaker = LazySpeaker(piper, engine_name="piper")
    with (
        serve(create_app(test_settings, engine=tiny_engine, speaker=speaker)) as base,
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        assert http.get("/health").json()["tts"] == {"engine": "piper", "loaded": False}
        first = ask(http, prompt="Say something.", response_format="wav", max_new_tokens=12)
        assert first.status_code == 200 and first.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(first.content)) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
            assert wav.getnframes() > 0
        assert http.get("/health").json()["tts"]["loaded"] is True
        second = ask(http, prompt="Again.", response_format="wav", max_new_tokens=4)
        assert second.status_code == 200 and second.content[:4] == b"RIFF"
    assert loads == [1]


def test_health_is_503_while_loading(tiny_model_dir, test_settings, speaker):
    gate = threading.Event()

    def slow_loader():
        gate.wait(60)
        return load_model(tiny_model_dir, device="cpu")

    engine = Engine(slow_loader)
    with (
        serve(create_app(test_settings, engine=engine, speaker=speaker)) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        loading = http.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert_error(ask(http, prompt="x"), 503, "still loading")
        gate.set()
        engine.wait_ready(60)
        assert http.get("/health").status_code == 200
        assert ask(http, prompt="x").status_code == 200
