"""Operational limits on real servers: API keys, the body cap, the bounded queue, timeouts,
cancellation on disconnect, and Prometheus metrics.

Queue and cancellation tests run on their own engine (one row at a time, one waiting place) so a
long generation really occupies it; nothing sleeps to wait, every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from snark.app import create_app
from snark.engine.request import GenerationRequest, RequestState
from snark.engine.transformers import TransformersEngine as Engine
from snark.values import FinishReason
from tests.conftest import hang_up_once, serve, start_engine
from tests.conftest import wait_until as shared_wait_until

LONG = 2000  # tokens: ~1 min on the tiny model at CPU speed, so only cancellation ends it early


def chat(max_tokens: int = 4, **extra) -> dict:
    body = {
        "model": "snark",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if max_tokens == LONG:
        body["ignore_eos"] = True  # vLLM's flag: a random end-of-turn cannot end the long row early
    return {**body, **extra}


def create_args(body: dict) -> dict:
    """``chat()`` for the openai client: its ``create`` takes vLLM-style extensions only in extra_body."""
    body = dict(body)
    if "ignore_eos" in body:
        body["extra_body"] = {"ignore_eos": body.pop("ignore_eos")}
    return body


wait_until = partial(shared_wait_until, timeout_s=15.0, poll_s=0.02)


def next_content(lines: Iterator[str]) -> str:
    """Read SSE lines until the next one carrying generated text. Callers keep ``lines`` alive: a
    dropped httpx line iterator closes its connection, which would cancel the stream too early."""
    for line in lines:
        if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
            return line
    raise AssertionError("the stream ended without content")


def openai_client(url: str, **options) -> openai.OpenAI:
    return openai.OpenAI(**{"base_url": f"{url}/v1", "api_key": "unused", "max_retries": 0, "timeout": 30, **options})


# --- a one-row engine ----------------------------------------------------------------------------


class Small:
    def __init__(self, engine: Engine, url: str) -> None:
        self.engine, self.url = engine, url
        self.ended: list[GenerationRequest] = []
        engine.add_listener(self.ended.append)  # runs in the worker thread as each request ends

    def ended_long(self, state: RequestState) -> GenerationRequest | None:
        return next((r for r in self.ended if r.params.max_new_tokens == LONG and r.state is state), None)

    def idle(self) -> bool:
        return self.engine.num_running == 0 and self.engine.num_waiting == 0


@pytest.fixture(scope="module")
def small(tiny_model_dir, test_settings, speaker) -> Iterator[Small]:
    engine = start_engine(tiny_model_dir, max_batch_size=1, max_waiting_requests=1, batch_wait_ms=0)
    try:
        with serve(create_app(test_settings, engine=engine, speaker=speaker)) as url:
            yield Small(engine, url)
    finally:
        engine.stop()


@pytest.fixture
def fresh(small: Small) -> Small:
    wait_until(small.idle, "the engine to be idle before the test")
    small.ended.clear()
    return small


def test_full_queue_answers_503_with_retry_after(fresh: Small) -> None:
    client = openai_client(fresh.url)
    with httpx.Client(base_url=fresh.url, timeout=30) as http, contextlib.ExitStack() as streams:
        running = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=chat(LONG, stream=True)))
        running_lines = running.iter_lines()
        next_content(running_lines)
        waiting = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=chat(LONG, stream=True)))
        assert waiting.status_code == 200
        wait_until(lambda: fresh.engine.num_waiting == 1, "the second request to wait")

        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(**chat())
        assert info.value.status_code == 503 and info.value.code == "queue_full"
        assert int(info.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError) as info:  # streamed: refused before the stream starts
            client.chat.completions.create(**chat(stream=True))
        assert info.value.status_code == 503
        form = http.post("/infer/text", data={"prompt": "Hi", "stream": "true"})
        assert form.status_code == 503 and form.json()["error"]["code"] == "queue_full"
    # Both streams are closed now: their rows are cancelled and their places freed.
    wait_until(fresh.idle, "the engine to drop both cancelled requests")
    assert client.chat.completions.create(**chat()).choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_stops_generation(fresh: Small) -> None:
    with httpx.Client(base_url=fresh.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat(LONG, stream=True)) as response:
            lines = response.iter_lines()
            next_content(lines)
            next_content(lines)
            assert fresh.engine.num_running == 1 and not fresh.ended  # tokens arrive while the row runs
        # leaving the block closes the connection mid-stream
    cancelled = wait_until(lambda: fresh.ended_long(RequestState.CANCELLED), "the engine to cancel the row")
    # Events, not speed: the row ended as cancelled, before its own end, and left the batch.
    assert cancelled.finish_reason is FinishReason.CANCELLED and cancelled.completion_tokens < LONG
    # The next request is served at once, not after the abandoned 2000 tokens (the client gives up at 20 s).
    reply = openai_client(fresh.url, timeout=20).chat.completions.create(**chat())
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_plain_answer_stops_generation(fresh: Small) -> None:
    # The client hangs up while its row is generating (2000 tokens: it cannot have ended yet).
    hang_up_once(fresh.url, "/v1/chat/completions", chat(LONG), running=lambda: fresh.engine.num_running == 1)
    cancelled = wait_until(lambda: fresh.ended_long(RequestState.CANCELLED), "the engine to cancel the row")
    # Events, not speed: the row ended as cancelled, before its own end, and left the batch.
    assert cancelled.finish_reason is FinishReason.CANCELLED and cancelled.completion_tokens < LONG
    wait_until(fresh.idle, "the engine to be idle")


def test_request_timeout_is_504_and_frees_the_row(fresh: Small, test_settings, speaker) -> None:
    app = create_app(test_settings.model_copy(update={"request_timeout_s": 0.5}), engine=fresh.engine, speaker=speaker)
    with serve(app) as url:
        client = openai_client(url)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(**create_args(chat(LONG)))
        assert info.value.status_code == 504 and "SNARK_REQUEST_TIMEOUT_S" in info.value.message
        wait_until(lambda: fresh.ended_long(RequestState.CANCELLED), "the timed-out row to be cancelled")
        fresh.ended.clear()
        with pytest.raises(openai.APIError) as streamed:  # mid-stream: an error event, then [DONE]
            for _ in client.chat.completions.create(**create_args(chat(LONG, stream=True))):
                pass
        assert "SNARK_REQUEST_TIMEOUT_S" in streamed.value.message
        wait_until(lambda: fresh.ended_long(RequestState.CANCELLED), "the timed-out stream's row to be cancelled")


# --- API keys ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url(test_settings, tiny_engine, speaker) -> Iterator[str]:
    settings = test_settings.model_copy(update={"api_key": "alpha-key, beta-key"})
    with serve(create_app(settings, engine=tiny_engine, speaker=speaker)) as url:
        yield url


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/audio/speech"),
        ("GET", "/metrics"),
        ("POST", "/infer/text"),
        ("GET", "/"),
        ("GET", "/no/such/route"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Bearer alpha", "Basic alpha-key", "alpha-key"])
def test_every_route_but_health_needs_a_key(keyed_url: str, method: str, path: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, keyed_url + path, headers=headers, json=chat())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and "SNARK_API_KEY" in error["message"]
    assert "alpha-key" not in response.text


def test_the_docs_page_and_its_schema_open_without_a_key(keyed_url: str) -> None:
    docs = httpx.get(f"{keyed_url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(f"{keyed_url}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    # The page's "Authorize" button sends the key with the calls made from it.
    assert schema["components"]["securitySchemes"]["SNARK_API_KEY"] == {"type": "http", "scheme": "bearer"}
    assert httpx.get(f"{keyed_url}/openapi.json/extra").status_code == 401  # exact paths only


@pytest.mark.parametrize(
    ("authorization", "problem"),
    [
        ("alpha-key", "no 'Bearer ' prefix"),
        ("Basic alpha-key", "another scheme than Bearer"),
        ("Bearer nope", "not valid"),
        (None, "No API key was sent"),
    ],
)
def test_a_refused_key_says_what_is_wrong_with_the_header(
    keyed_url: str, authorization: str | None, problem: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{keyed_url}/v1/models", headers=headers)
    assert response.status_code == 401 and problem in response.json()["error"]["message"]
    assert "alpha-key" not in response.text


def test_health_is_open_and_any_configured_key_works(keyed_url: str) -> None:
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    for key in ("alpha-key", "beta-key"):
        client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=0)
        assert client.chat.completions.create(**chat(2)).usage.completion_tokens >= 1
        assert httpx.get(f"{keyed_url}/metrics", headers={"Authorization": f"bearer {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="gamma-key", max_retries=0).models.list()


# --- body cap ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_url(test_settings, tiny_engine, speaker) -> Iterator[str]:
    settings = test_settings.model_copy(update={"max_body_bytes": 4096})
    with serve(create_app(settings, engine=tiny_engine, speaker=speaker)) as url:
        yield url


def assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "SNARK_MAX_BODY_BYTES" in error["message"]


def test_body_over_the_cap_is_413_by_content_length(capped_url: str) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 5000}])
    assert_413(httpx.post(f"{capped_url}/v1/chat/completions", json=big))
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(capped_url).chat.completions.create(**big)
    assert info.value.status_code == 413


def test_chunked_body_over_the_cap_is_413_while_it_arrives(capped_url: str) -> None:
    pieces = iter([b'{"model": "snark", "messages": [{"role": "user", "content": "', b"x" * 3000, b"x" * 3000, b'"}]}'])
    response = httpx.post(
        f"{capped_url}/v1/chat/completions", content=pieces, headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers  # really sent chunked
    assert_413(response)


def test_upload_over_the_cap_is_413_and_bodies_under_it_pass(capped_url: str) -> None:
    assert_413(
        httpx.post(
            f"{capped_url}/infer/image",
            data={"prompt": "What?"},
            files={"image_file": ("a.png", b"\x89PNG" + b"0" * 6000)},
        )
    )
    assert httpx.post(f"{capped_url}/v1/chat/completions", json=chat(2)).status_code == 200


# --- metrics -------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        sample.name
        + (str(sorted(sample.labels.items())) if sample.labels and "le" not in sample.labels else ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "le" not in sample.labels
    }


def test_metrics_move_with_requests_and_speech(base_url: str) -> None:
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "_created" not in response.text  # creation-time series only double the lines
    before = scrape(base_url)
    for name in (
        "snark:num_requests_running",
        "snark:num_requests_waiting",
        "snark:prompt_tokens_total",
        "snark:tts_seconds_count",
        "snark:kv_cache_usage_perc",
    ):
        assert name in before, name
    reply = openai_client(base_url).chat.completions.create(**chat(5))
    success = "snark:request_success_total" + str([("finished_reason", reply.choices[0].finish_reason)])
    # The engine reports a request after its batch ends, just after the client got its answer.
    after = wait_until(
        lambda: (m := scrape(base_url)).get(success, 0) > before.get(success, 0) and m, "the request in /metrics"
    )
    assert after["snark:prompt_tokens_total"] - before["snark:prompt_tokens_total"] == reply.usage.prompt_tokens
    assert (
        after["snark:generation_tokens_total"] - before["snark:generation_tokens_total"]
        == reply.usage.completion_tokens
    )
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time"):
        name = f"snark:{histogram}_seconds_count"
        assert after[name] == before[name] + 1, name
    openai_client(base_url).audio.speech.create(
        model="tts-1", voice="alloy", input="Counted.", response_format="wav"
    ).read()
    assert scrape(base_url)["snark:tts_seconds_count"] == before["snark:tts_seconds_count"] + 1
