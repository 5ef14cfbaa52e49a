"""Each chat image's resolution over HTTP: ``detail`` low / high / auto, ``min_pixels`` / ``max_pixels``
inside ``image_url``, on the part or request-wide, always within the server's caps. An image costs one
prompt token per 28 x 28 pixels of its resized size, so ``usage.prompt_tokens`` shows the size it got."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from snark.app import create_app
from snark.config import load_settings
from tests.conftest import serve

SERVER_MIN, SERVER_MAX, LOW = 4 * 28 * 28, 1280 * 28 * 28, 512 * 512  # the test server's (default) caps


def png_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 160, 90)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


LARGE, SMALL = (1024, 1024), (100, 60)


def image_tokens(size: tuple[int, int], min_pixels: int, max_pixels: int) -> int:
    """Tokens of an image of ``size`` under these bounds, as Qwen2.5-VL's processor resizes it."""
    height, width = smart_resize(size[1], size[0], factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return height * width // (28 * 28)


def prompt_tokens(http: httpx.Client, size: tuple[int, int], image_url: dict | None = None, **part) -> int:
    return ask(http, size, image_url, **part).json()["usage"]["prompt_tokens"]


def ask(http: httpx.Client, size: tuple[int, int], image_url: dict | None = None, body=None, **part) -> httpx.Response:
    image = {"type": "image_url", "image_url": {"url": png_uri(size), **(image_url or {})}, **part}
    payload = {
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 1,
        "temperature": 0,
        **(body or {}),
    }
    return http.post("/v1/chat/completions", json=payload)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def test_low_detail_costs_fewer_tokens_and_high_is_the_servers_default(http):
    default = prompt_tokens(http, LARGE)
    assert prompt_tokens(http, LARGE, {"detail": "auto"}) == prompt_tokens(http, LARGE, {"detail": "high"}) == default
    low = prompt_tokens(http, LARGE, {"detail": "low"})
    assert default - low == image_tokens(LARGE, SERVER_MIN, SERVER_MAX) - image_tokens(LARGE, SERVER_MIN, LOW) > 0
    # Smaller than the low-detail cap already: low changes nothing.
    assert prompt_tokens(http, SMALL, {"detail": "low"}) == prompt_tokens(http, SMALL)


def test_pixel_bounds_inside_image_url_on_the_part_or_request_wide_nearest_first(http):
    default = prompt_tokens(http, LARGE)
    base = default - image_tokens(LARGE, SERVER_MIN, SERVER_MAX)  # the text's tokens, and the vision markers

    def expected(max_pixels: int) -> int:
        return base + image_tokens(LARGE, SERVER_MIN, max_pixels)

    cap = 64 * 28 * 28
    assert prompt_tokens(http, LARGE, {"max_pixels": cap}) == expected(cap)
    assert prompt_tokens(http, LARGE, max_pixels=cap) == expected(cap)
    assert prompt_tokens(http, LARGE, body={"mm_processor_kwargs": {"max_pixels": cap}}) == expected(cap)
    assert prompt_tokens(http, LARGE, {"max_pixels": 16 * 28 * 28}, max_pixels=cap) == expected(16 * 28 * 28)
    assert prompt_tokens(http, LARGE, max_pixels=16 * 28 * 28, body={"mm_processor_kwargs": {"max_pixels": cap}}) == (
        expected(16 * 28 * 28)
    )
    # Numbers given with the image win over its detail.
    assert prompt_tokens(http, LARGE, {"detail": "low", "max_pixels": 600 * 28 * 28}) == expected(600 * 28 * 28)
    # min_pixels upscales a small image, as Qwen's processor does.
    small = prompt_tokens(http, SMALL)
    larger = prompt_tokens(http, SMALL, {"min_pixels": 64 * 28 * 28})
    assert larger - small == image_tokens(SMALL, 64 * 28 * 28, SERVER_MAX) - image_tokens(SMALL, SERVER_MIN, SERVER_MAX)


def test_bounds_are_held_within_the_servers_caps(http):
    assert prompt_tokens(http, LARGE, {"max_pixels": 10**12}) == prompt_tokens(http, LARGE)
    small = prompt_tokens(http, SMALL)
    base = small - image_tokens(SMALL, SERVER_MIN, SERVER_MAX)
    # Below the server's minimum: raised to it.
    assert prompt_tokens(http, SMALL, {"max_pixels": 28 * 28}) == base + image_tokens(SMALL, SERVER_MIN, SERVER_MIN)
    # Above its cap: lowered to it.
    assert prompt_tokens(http, SMALL, {"min_pixels": 10**12}) == base + image_tokens(SMALL, SERVER_MAX, SERVER_MAX)
    # A minimum over the maximum is lowered to it.
    crossed = {"min_pixels": 900 * 28 * 28, "max_pixels": 100 * 28 * 28}
    assert prompt_tokens(http, SMALL, crossed) == base + image_tokens(SMALL, 100 * 28 * 28, 100 * 28 * 28)


def test_the_low_detail_cap_is_a_setting(test_settings, tiny_engine, speaker):
    settings = load_settings(
        vlm_model=test_settings.vlm_model, allow_private_urls=True, low_detail_image_pixels=16 * 28 * 28
    )
    with serve(create_app(settings, engine=tiny_engine, speaker=speaker)) as url, httpx.Client(base_url=url) as http:
        low, default = prompt_tokens(http, LARGE, {"detail": "low"}), prompt_tokens(http, LARGE)
    assert default - low == image_tokens(LARGE, SERVER_MIN, SERVER_MAX) - image_tokens(LARGE, SERVER_MIN, 16 * 28 * 28)


@pytest.mark.parametrize(
    ("image_url", "part", "param"),
    [
        ({"detail": "medium"}, {}, "messages[0].content[0].image_url.detail"),
        ({"max_pixels": 100}, {}, "messages[0].content[0].image_url.max_pixels"),
        ({}, {"min_pixels": "many"}, "messages[0].content[0].min_pixels"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(http, image_url, part, param):
    reply = ask(http, SMALL, image_url, **part)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_responses_and_tokenize_give_an_image_the_resolution_it_asks_for(http):
    """/v1/responses' input_image and /tokenize's chat messages take chat's per-image resolution."""
    chat = {level: prompt_tokens(http, LARGE, {"detail": level}) for level in ("low", "high")}
    assert chat["low"] < chat["high"]
    for level in ("low", "high"):
        image = {"type": "input_image", "image_url": png_uri(LARGE), "detail": level}
        response = http.post(
            "/v1/responses",
            json={
                "input": [{"role": "user", "content": [image, {"type": "input_text", "text": "What is it?"}]}],
                "max_output_tokens": 1,
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["input_tokens"] == chat[level]
        part = {"type": "image_url", "image_url": {"url": png_uri(LARGE), "detail": level}}
        counted = http.post(
            "/tokenize",
            json={"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]},
        )
        assert counted.status_code == 200, counted.text
        assert counted.json()["count"] == chat[level]
