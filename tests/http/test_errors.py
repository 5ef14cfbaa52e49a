"""Client mistakes over real HTTP get the one error shape with a message that says how to fix them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest

from snark.logs import HealthCheckFilter


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_json_sent_to_a_form_route_points_to_form_fields_and_the_json_api(http: httpx.Client) -> None:
    error = error_of(http.post("/infer/text", json={"prompt": "Hello"}), 400)
    assert "takes form fields" in error["message"] and "application/json" in error["message"]
    assert "/v1/chat/completions" in error["message"]


@pytest.mark.parametrize("multipart", [False, True])
def test_an_empty_prompt_is_called_empty(http: httpx.Client, multipart: bool) -> None:
    sent = {"files": {"prompt": (None, "")}} if multipart else {"data": {"prompt": ""}}
    error = error_of(http.post("/infer/text", **sent), 400)
    assert "prompt is empty" in error["message"] and error["param"] == "prompt"


def test_a_missing_prompt_is_still_called_missing(http: httpx.Client) -> None:
    error = error_of(http.post("/infer/text", data={"max_new_tokens": "4"}), 400)
    assert "prompt" in error["message"] and "Field required" in error["message"]


def test_chat_without_a_json_content_type_says_which_header_to_send(http: httpx.Client) -> None:
    body = b'{"model": "qwen", "messages": [{"role": "user", "content": "Hi"}]}'
    as_form = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    error = error_of(as_form, 400)
    assert "Content-Type: application/json" in error["message"] and "x-www-form-urlencoded" in error["message"]
    not_an_object = http.post("/v1/chat/completions", json=[1, 2])
    assert "JSON object" in error_of(not_an_object, 400)["message"]


def test_a_wrong_method_names_the_allowed_one_in_the_error_shape(http: httpx.Client) -> None:
    response = http.get("/infer/text")
    error = error_of(response, 405)
    assert error["code"] == "method_not_allowed" and "use POST" in error["message"]
    assert response.headers["allow"] == "POST"
    assert "use GET" in error_of(http.post("/health"), 405)["message"]


@pytest.mark.parametrize(
    ("sent", "field"),
    [
        ({"data": {"image_url": "file:///etc/passwd"}}, "image_url"),
        ({"data": {"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, "image_url"),
        ({"files": {"image_file": ("notes.txt", io.BytesIO(b"hello"), "text/plain")}}, "image_file"),
    ],
)
def test_image_errors_on_the_form_route_name_the_field(http: httpx.Client, sent: dict, field: str) -> None:
    sent.setdefault("data", {})["prompt"] = "What is this?"
    error = error_of(http.post("/infer/image", **sent), 400)
    assert error["param"] == field


def test_the_root_points_to_the_docs_and_the_readme(http: httpx.Client) -> None:
    body = http.get("/").json()
    assert body["docs"] == "/docs" and body["openapi"] == "/openapi.json" and "docs/api.md" in body["message"]
    assert http.get(body["docs"]).status_code == 200


def test_unknown_routes_point_to_the_docs(http: httpx.Client) -> None:
    assert "/docs" in error_of(http.get("/v2/chat"), 404)["message"]


@pytest.mark.parametrize(
    ("path", "kept"), [("/health", False), ("/health?verbose=1", False), ("/v1/models", True), ("/healthz", True)]
)
def test_the_access_log_leaves_out_health_checks(path: str, kept: bool) -> None:
    # The record uvicorn's access logger writes: (client, method, path, http version, status).
    args = ("127.0.0.1:5000", "GET", path, "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
    assert HealthCheckFilter().filter(record) is kept
