"""Chat log-probabilities over HTTP, with the official ``openai`` client and raw HTTP, on the tiny model:
OpenAI's shape whole and streamed, one entry per generated token, each streamed chunk carrying the
entries of its own text, tool calls covered, the limits and refusals as 400s naming the field."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.http.test_structured_outputs import WEATHER

GREEDY = {"model": "snark", "temperature": 0}
ASK = [{"role": "user", "content": "Name a colour."}]
UNTIL_LENGTH = {"ignore_eos": True}  # every answer runs to max_tokens: no end-of-turn token in it


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url: str):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def _text_of(entries) -> str:
    """The text the entries' bytes make; special tokens (``<|...|>``) are not part of an answer's text."""
    text = (e for e in entries if not (e.token.startswith("<|") and e.token.endswith("|>")))
    return b"".join(bytes(entry.bytes) for entry in text).decode()


def test_a_whole_answer_has_one_entry_per_token_with_its_top_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        messages=ASK, max_tokens=8, logprobs=True, top_logprobs=5, extra_body=UNTIL_LENGTH, **GREEDY
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.refusal is None
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert _text_of(content) == choice.message.content  # the exact bytes join into the answer
    for entry in content:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        assert len(entry.top_logprobs) == 5
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
    plain = client.chat.completions.create(messages=ASK, max_tokens=8, extra_body=UNTIL_LENGTH, **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_streamed_chunks_carry_the_entries_of_their_own_text(client: openai.OpenAI) -> None:
    request = {"messages": ASK, "max_tokens": 12, "logprobs": True, "top_logprobs": 2, "extra_body": UNTIL_LENGTH}
    whole = client.chat.completions.create(**request, **GREEDY).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**request, stream=True, **GREEDY):
        choice = chunk.choices[0]
        entries = choice.logprobs.content if choice.logprobs is not None else []
        assert _text_of(entries) == (choice.delta.content or "")
        streamed += entries
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_logprobs_without_top_logprobs_and_the_end_of_turn_token(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(messages=ASK, max_tokens=40, logprobs=True, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(entry.top_logprobs == [] for entry in content)
    if reply.choices[0].finish_reason == "stop":  # the end-of-turn token has its entry too, as in vLLM
        assert content[-1].token == "<|im_end|>"


def test_tool_calls_have_entries_for_every_generated_token(client: openai.OpenAI) -> None:
    for stream in (False, True):
        request = {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": 120,
            "tools": [WEATHER],
            "tool_choice": "required",
            "logprobs": True,
            "stream": stream,
            **GREEDY,
        }
        if not stream:
            reply = client.chat.completions.create(**request)
            assert reply.choices[0].message.tool_calls
            assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
            continue
        chunks = list(client.chat.completions.create(**request, stream_options={"include_usage": True}))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        assert len(entries) == chunks[-1].usage.completion_tokens


def test_tokens_ruled_out_by_top_k_are_floored_as_valid_json(http: httpx.Client) -> None:
    body = {
        "messages": ASK,
        "max_tokens": 4,
        "temperature": 0.9,
        "top_k": 2,
        "seed": 5,
        "logprobs": True,
        "top_logprobs": 4,
    }
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    parsed = json.loads(reply.text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    for entry in parsed["choices"][0]["logprobs"]["content"]:
        values = [top["logprob"] for top in entry["top_logprobs"]]
        assert values[2:] == [-9999.0, -9999.0] and all(value > -9999.0 for value in values[:2])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
        ({"logprobs": True, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "logprobs"),
    ],
)
def test_logprob_requests_that_cannot_be_answered_are_a_400_naming_the_field(
    http: httpx.Client, fields: dict, param: str
) -> None:
    reply = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **fields})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
