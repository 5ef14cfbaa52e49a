"""``/v1/completions``, ``n`` and ``/tokenize`` + ``/detokenize`` on the tiny model, through the official
``openai`` client and raw HTTP.

Answers are noise, but greedy decoding is deterministic: a raw prompt sent as text or as its token ids
gets the same answer, a streamed answer equals the plain one, and greedy choices of one prompt are
equal. Sampled choices with a seed are repeatable one by one (choice i samples with seed + i).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from snark.engine.request import GenerationRequest, RequestState
from snark.values import FinishReason
from tests.conftest import hang_up_once, wait_until
from tests.http.test_structured_outputs import ASK, TIME, check_calls

GREEDY = {"model": "snark", "temperature": 0}
SAMPLED = {"model": "snark", "temperature": 1.0, "extra_body": {"top_k": -1}}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def tokenize(http: httpx.Client, text: str) -> list[int]:
    answer = http.post("/tokenize", json={"prompt": text})
    assert answer.status_code == 200, answer.text
    return answer.json()["tokens"]


def sse_events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def refusal(http: httpx.Client, path: str, body: dict) -> dict:
    answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


# --- /v1/completions -------------------------------------------------------------------------------


def test_completion_has_openai_shape_and_no_chat_template(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = client.completions.create(prompt="The capital of France is", max_tokens=5, **GREEDY)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.model == "snark-tiny-random-qwen2.5-vl"
    [choice] = reply.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.text, str)
    # No template around the prompt: it is exactly its own tokens.
    assert reply.usage.prompt_tokens == len(tokenize(http, "The capital of France is")) == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert (
        reply.usage.completion_tokens == 5 if choice.finish_reason == "length" else reply.usage.completion_tokens <= 5
    )
    # OpenAI's default is 16 tokens.
    default = client.completions.create(prompt="Once upon a time", extra_body={"ignore_eos": True}, **GREEDY)
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_text_and_token_id_prompts_get_the_same_answer(client: openai.OpenAI, http: httpx.Client) -> None:
    text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"  # a client may format its own prompt
    ids = tokenize(http, text)
    assert ids[0] == 151644  # <|im_start|> read as its special token
    by_text = client.completions.create(prompt=text, max_tokens=8, **GREEDY)
    by_ids = client.completions.create(prompt=ids, max_tokens=8, **GREEDY)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)


def test_several_prompts_and_n_number_choices_as_openai(client: openai.OpenAI, http: httpx.Client) -> None:
    prompts = ["One two three", "Alpha beta"]
    reply = client.completions.create(prompt=prompts, n=3, max_tokens=4, **GREEDY)
    assert [c.index for c in reply.choices] == list(range(6))  # prompt_index * n + i
    alone = [client.completions.create(prompt=p, max_tokens=4, **GREEDY).choices[0].text for p in prompts]
    assert [c.text for c in reply.choices] == [alone[0]] * 3 + [alone[1]] * 3  # greedy choices agree
    assert reply.usage.prompt_tokens == sum(len(tokenize(http, p)) for p in prompts)  # each prompt once
    generated = client.completions.create(prompt=prompts, n=3, max_tokens=4, **GREEDY).usage.completion_tokens
    assert reply.usage.completion_tokens == generated >= 6  # every choice's tokens
    ids = [tokenize(http, p) for p in prompts]
    by_ids = client.completions.create(prompt=ids, n=1, max_tokens=4, **GREEDY)
    assert [c.text for c in by_ids.choices] == alone


def test_seeded_choices_are_each_repeatable(client: openai.OpenAI) -> None:
    prompt = "Tell me something"
    many = client.completions.create(prompt=prompt, n=3, max_tokens=6, seed=41, **SAMPLED)
    alone = [client.completions.create(prompt=prompt, max_tokens=6, seed=41 + i, **SAMPLED) for i in range(3)]
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in many.choices}) > 1  # each choice samples on its own


def test_stream_interleaves_choices_and_equals_the_plain_answer(client: openai.OpenAI, http: httpx.Client) -> None:
    plain = client.completions.create(prompt="Count: one", n=2, max_tokens=12, **GREEDY)
    body = {"prompt": "Count: one", "n": 2, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(http, "/v1/completions", {**body, "model": "snark", "temperature": 0})
    *chunks, last = events
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert last["choices"] == [] and last["usage"] == plain.usage.model_dump(exclude_none=True)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == plain.choices[index].text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [plain.choices[index].finish_reason]
        assert mine[-1]["finish_reason"] is not None  # the choice's last chunk
    indices = [c["choices"][0]["index"] for c in chunks]
    assert indices != sorted(indices)  # interleaved, not one choice after the other


def test_echo_puts_the_prompt_before_the_answer(client: openai.OpenAI, http: httpx.Client) -> None:
    answer = client.completions.create(prompt="Echo me", max_tokens=3, **GREEDY).choices[0].text
    echoed = client.completions.create(prompt="Echo me", max_tokens=3, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Echo me" + answer
    ids = tokenize(http, "Echo me")
    by_ids = client.completions.create(prompt=ids, max_tokens=3, echo=True, **GREEDY)
    assert by_ids.choices[0].text == "Echo me" + answer  # the ids' own text
    only = client.completions.create(prompt="Echo me", max_tokens=0, echo=True, n=2, **GREEDY)
    assert [c.text for c in only.choices] == ["Echo me", "Echo me"]
    assert [c.finish_reason for c in only.choices] == ["length", "length"] and only.usage.completion_tokens == 0
    events = sse_events(http, "/v1/completions", {"prompt": "Echo me", "max_tokens": 3, "echo": True, "stream": True})
    assert events[0]["choices"][0]["text"] == "Echo me"


def test_json_schema_holds_for_every_choice(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    reply = client.completions.create(
        prompt="JSON:",
        n=3,
        max_tokens=20,
        seed=3,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
            "top_k": -1,
        },
        model="snark",
        temperature=1.0,
    )
    assert [json.loads(c.text).keys() for c in reply.choices] == [{"ok"}] * 3


def test_choices_share_the_prompt_prefill(http: httpx.Client, base_url: str) -> None:
    # A prompt no other test sends, 100 tokens: its first choice finds nothing cached; the other three
    # find its 6 full 16-token blocks (the block holding the last token is always computed afresh).
    ids = tokenize(http, " ".join(f"w{i}" for i in range(200)))[:100]
    before = prefix_counts(base_url)
    reply = http.post("/v1/completions", json={"prompt": ids, "n": 4, "max_tokens": 2, **GREEDY})
    assert reply.status_code == 200, reply.text
    queries, hits = (a - b for a, b in zip(prefix_counts(base_url), before))
    assert queries == 4 * 100 and hits == 3 * 96


def prefix_counts(base_url: str) -> tuple[float, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)}
    return tuple(families[f"snark:prefix_cache_{kind}"].samples[0].value for kind in ("queries", "hits"))


def test_a_client_that_leaves_cancels_every_choice(tiny_engine, base_url: str) -> None:
    ended: list[GenerationRequest] = []
    tiny_engine.add_listener(ended.append)  # runs in the engine's thread as each request ends
    long = 2000  # tokens: only cancellation ends them early
    body = {"prompt": "Go on", "n": 3, "max_tokens": long, "ignore_eos": True, **GREEDY}
    hang_up_once(base_url, "/v1/completions", body, running=lambda: tiny_engine.num_running == 3)
    mine = wait_until(
        lambda: (rows := [r for r in ended if r.params.max_new_tokens == long]) and len(rows) == 3 and rows,
        "the three choices to end",
    )
    assert all(r.state is RequestState.CANCELLED and r.finish_reason is FinishReason.CANCELLED for r in mine)
    assert all(r.completion_tokens < long for r in mine)


def test_refusals_name_the_field(http: httpx.Client, base_url: str) -> None:
    cases = {
        "suffix": {"prompt": "a", "suffix": "b"},
        "best_of": {"prompt": "a", "best_of": 3},
        "n": {"prompt": "a", "n": 9},
        "logprobs": {"prompt": "a", "logprobs": 21},
        "max_tokens": {"prompt": "a", "max_tokens": 0},
        "logit_bias": {"prompt": "a", "logit_bias": {"1": 5}},
        "stream_options": {"prompt": "a", "stream_options": {"include_usage": True}},
    }
    for field, body in cases.items():
        error = refusal(http, "/v1/completions", body)
        assert error["param"] == field and field in error["message"], error
    assert http.post("/v1/completions", json={"prompt": "a", "best_of": 2, "n": 2, "max_tokens": 1}).status_code == 200
    out_of_vocab = refusal(http, "/v1/completions", {"prompt": [[1, 2], [3, 10**6]]})
    assert out_of_vocab["param"] == "prompt[1]" and "prompt[1][1] is 1000000" in out_of_vocab["message"]
    image_pad = refusal(http, "/v1/completions", {"prompt": [9707, 151655]})
    assert image_pad["param"] == "prompt" and "<|image_pad|>" in image_pad["message"]
    too_long = refusal(http, "/v1/completions", {"prompt": [9707] * 40000, "max_tokens": 1})
    assert too_long["code"] == "context_length_exceeded" and "SNARK_MAX_PROMPT_TOKENS" in too_long["message"]
    assert refusal(http, "/v1/completions", {"prompt": []})["param"] == "prompt"
    assert refusal(http, "/v1/completions", {"prompt": ""})["param"] == "prompt"
    assert refusal(http, "/v1/completions", {"prompt": ["a"] * 30, "n": 3})["param"] == "prompt"  # 90 > 64 queued


# --- n on chat -------------------------------------------------------------------------------------


def test_chat_n_gives_independent_choices(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Hello"}]
    greedy = client.chat.completions.create(messages=ask, n=3, max_tokens=5, **GREEDY)
    alone = client.chat.completions.create(messages=ask, max_tokens=5, **GREEDY)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {alone.choices[0].message.content}
    assert greedy.usage.prompt_tokens == alone.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * alone.usage.completion_tokens
    sampled = client.chat.completions.create(messages=ask, n=2, max_tokens=6, seed=5, **SAMPLED)
    again = [client.chat.completions.create(messages=ask, max_tokens=6, seed=5 + i, **SAMPLED) for i in range(2)]
    assert [c.message.content for c in sampled.choices] == [a.choices[0].message.content for a in again]


def test_chat_n_streams_each_choice_with_its_finish_reason(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Hello"}]
    plain = client.chat.completions.create(messages=ask, n=2, max_tokens=8, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            messages=ask, n=2, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == plain.choices[index].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [plain.choices[index].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_n_with_tools_every_choice_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        messages=ASK,
        tools=[TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        n=3,
        max_tokens=200,
        seed=9,
        **SAMPLED,
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:  # each sampled on its own, each held to the same grammar
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, {"get_time"})
        assert len(choice.message.tool_calls) == 1


def test_chat_n_refusals(http: httpx.Client) -> None:
    ask = [{"role": "user", "content": "Hi"}]
    over = refusal(http, "/v1/chat/completions", {"messages": ask, "n": 9})
    assert over["param"] == "n" and "SNARK_MAX_N" in over["message"]
    spoken = {"messages": ask, "n": 2, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    assert refusal(http, "/v1/chat/completions", spoken)["param"] == "n"


# --- /tokenize and /detokenize ----------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    answer = http.post("/tokenize", json={"prompt": "héllo wörld 你好", "return_token_strs": True}).json()
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"]) > 3
    assert answer["max_model_len"] == 32768  # the tiny model's positions; its KV budget is larger
    assert answer["token_strs"][0] == "h" and "Ġw" in answer["token_strs"]  # as the vocabulary spells them
    assert http.post("/detokenize", json={"tokens": answer["tokens"]}).json() == {"prompt": "héllo wörld 你好"}
    plain = http.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    assert plain["token_strs"] is None and plain["count"] == 1
    bad = refusal(http, "/detokenize", {"tokens": [9707, -1]})
    assert bad["param"] == "tokens" and "tokens[1] is -1" in bad["message"]


def test_tokenize_a_chat_counts_what_chat_sends(client: openai.OpenAI, http: httpx.Client) -> None:
    from tests.http.test_openai_api import data_uri

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri((56, 84))}}, "Hi"]}]
    messages[0]["content"][1] = {"type": "text", "text": "What is this?"}
    counted = http.post("/tokenize", json={"messages": messages}).json()
    sent = client.chat.completions.create(messages=messages, max_tokens=1, **GREEDY).usage.prompt_tokens
    assert counted["count"] == sent == len(counted["tokens"])
    assert counted["tokens"].count(151655) == 6  # the image's own tokens: 56x84 pixels are 2x3 merged patches
    assert refusal(http, "/tokenize", {"messages": messages, "add_generation_prompt": False})["param"] == (
        "add_generation_prompt"
    )
    assert refusal(http, "/tokenize", {"messages": messages, "prompt": "x"})["param"] == "prompt"
    assert refusal(http, "/tokenize", {})["param"] == "messages"


# --- log-probabilities ------------------------------------------------------------------------------


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = tokenize(http, "The quick brown fox")
    scored = client.completions.create(prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1, **GREEDY)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == "The quick brown fox" and scored.usage.completion_tokens == 0
    assert len(logprobs.tokens) == len(ids) and "".join(logprobs.tokens) == "The quick brown fox"
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing before the first
    assert all(lp <= 0 and math.isfinite(lp) for lp in logprobs.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])  # the token itself and 1 alternative
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    # With generation, the prompt's entries come first, then the answer's; greedy tokens are the top entry.
    both = client.completions.create(prompt="The quick brown fox", max_tokens=3, echo=True, logprobs=2, **GREEDY)
    entries = both.choices[0].logprobs
    assert entries.token_logprobs[: len(ids)] == pytest.approx(logprobs.token_logprobs, abs=1e-4)
    for token, logprob, top in zip(
        entries.tokens[len(ids) :], entries.token_logprobs[len(ids) :], entries.top_logprobs[len(ids) :]
    ):
        assert logprob == pytest.approx(max(top.values())) and top[token] == logprob
    assert "".join(entries.tokens) == both.choices[0].text


def test_streamed_logprobs_follow_the_text(http: httpx.Client) -> None:
    body = {"prompt": "Hello there", "max_tokens": 6, "logprobs": 0, "echo": True, "stream": True, **GREEDY}
    events = sse_events(http, "/v1/completions", body)
    texts = [c["choices"][0]["text"] for c in events]
    logprobs = [c["choices"][0]["logprobs"] for c in events if c["choices"][0]["logprobs"]]
    assert logprobs[0]["token_logprobs"][0] is None and texts[0] == "Hello there"
    offsets = [offset for block in logprobs for offset in block["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert "".join(t for block in logprobs for t in block["tokens"]) == "".join(texts)
