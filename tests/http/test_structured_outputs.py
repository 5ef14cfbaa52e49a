"""Structured outputs and tool calls through the official ``openai`` client, on the tiny model.

The tiny model's weights are random: left alone it writes noise, never JSON. So every output that
parses and validates here does so because the grammar forced it, token by token; and every schema
is bounded (maxLength, maxItems, enums, integer ranges), so a constrained answer always ends well
within its token budget, greedy or sampled.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from snark.structured.constraint import json_schema_output
from snark.values import ChatTurn, SamplingParams

GREEDY = {"model": "snark", "temperature": 0}
ASK = [{"role": "user", "content": "Read the receipt and answer in JSON."}]

RECEIPT = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 16},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "total_cents": {"type": "integer", "minimum": 0, "maximum": 100000},
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["name", "quantity"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["store", "currency", "total_cents", "items"],
    "additionalProperties": False,
}
CODES = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "level": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "nested": {
            "type": "object",
            "properties": {
                "ok": {"type": "boolean"},
                "why": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
            },
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
    "required": ["code", "tags", "nested"],
    "additionalProperties": False,
}
SCHEMAS = {"receipt": RECEIPT, "codes": CODES}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOL_SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# --- JSON schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]
)
def test_every_answer_parses_and_validates(client: openai.OpenAI, name: str, sampling: dict) -> None:
    schema = SCHEMAS[name]
    reply = client.chat.completions.create(
        model="snark", messages=ASK, max_tokens=400, response_format=schema_format(schema), **sampling
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # a bounded schema ends well within 400 tokens
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_the_streamed_answer_is_the_same_json(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        messages=ASK, max_tokens=400, response_format=schema_format(RECEIPT), **GREEDY
    )
    stream = client.chat.completions.create(
        messages=ASK, max_tokens=400, response_format=schema_format(RECEIPT), stream=True, **GREEDY
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), RECEIPT)


class Item(BaseModel):
    name: str = Field(max_length=10)
    price_cents: int = Field(ge=0, le=9999)


class Receipt(BaseModel):
    store: str = Field(max_length=12)
    kind: Literal["grocery", "fuel", "other"]
    items: list[Item] = Field(max_length=3)


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        reply = client.chat.completions.parse(
            model="snark", messages=ASK, max_tokens=400, response_format=Receipt, temperature=1.0, seed=seed
        )
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Receipt) and len(parsed.items) <= 3


def test_json_object_answers_with_an_object_or_runs_out_of_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        messages=ASK, max_tokens=64, response_format={"type": "json_object"}, **GREEDY
    )
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")  # no free whitespace before it, no other value
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # the token limit cut it: the text so far, as OpenAI answers
        assert choice.finish_reason == "length" and reply.usage.completion_tokens == 64


def test_an_image_and_a_schema_in_one_request(client: openai.OpenAI) -> None:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "JSON please"}],
        }
    ]
    reply = client.chat.completions.create(
        messages=messages, max_tokens=400, response_format=schema_format(CODES), **GREEDY
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), CODES)


def test_the_form_endpoint_takes_a_json_schema(base_url: str) -> None:
    answer = httpx.post(
        f"{base_url}/infer/text",
        data={
            "prompt": "Receipt as JSON",
            "max_new_tokens": "400",
            "temperature": "0",
            "json_schema": json.dumps(RECEIPT),
        },
        timeout=120,
    ).json()
    assert answer["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["text"]), RECEIPT)


# --- tool calls ------------------------------------------------------------------------------------


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_tool_choice_required_gives_a_valid_call(client: openai.OpenAI) -> None:
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        reply = client.chat.completions.create(
            model="snark",
            messages=ASK,
            max_tokens=200,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            **sampling,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1  # parallel_tool_calls=false: one call
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        messages=ASK,
        max_tokens=200,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        **GREEDY,
    )
    check_calls(reply.choices[0].message.tool_calls, {"get_time"})


def test_parallel_calls_are_each_valid(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        messages=ASK, max_tokens=300, tools=[WEATHER, TIME], tool_choice="required", **GREEDY
    )
    choice = reply.choices[0]
    check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    assert choice.finish_reason in ("tool_calls", "length")  # a random model may call until the token limit


def test_a_streamed_call_arrives_as_openai_streams_it(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        messages=ASK, max_tokens=200, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **GREEDY
    )
    with client.beta.chat.completions.stream(
        model="snark",
        messages=ASK,
        max_tokens=200,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    ) as stream:
        deltas = [event for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(deltas) >= 2  # the arguments arrived in pieces
    streamed, plain = final.choices[0], whole.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert streamed.message.tool_calls[0].function.name == plain.message.tool_calls[0].function.name
    assert streamed.message.tool_calls[0].function.arguments == plain.message.tool_calls[0].function.arguments
    check_calls(streamed.message.tool_calls, {"get_weather"})


def test_auto_shows_the_tools_and_none_hides_them(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(messages=ASK, max_tokens=8, **GREEDY)
    auto = client.chat.completions.create(messages=ASK, max_tokens=8, tools=[WEATHER], **GREEDY)
    hidden = client.chat.completions.create(messages=ASK, max_tokens=8, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are described in the system turn
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert hidden.choices[0].message.content == plain.choices[0].message.content


def test_a_conversation_with_calls_and_results_goes_on(client: openai.OpenAI) -> None:
    messages = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]
    reply = client.chat.completions.create(messages=messages, max_tokens=8, tools=[WEATHER, TIME], **GREEDY)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# --- one batch, constrained and free rows ------------------------------------------------------------


def test_constrained_and_free_rows_share_a_batch(tiny_engine) -> None:
    """A free row's greedy answer is the same beside constrained rows as alone; the constrained ones
    validate. Rows join the same running batch (the engine batches up to 8)."""

    async def run():
        prompt = await tiny_engine.build_prompt([ChatTurn("user", ["Receipt?"])], min_pixels=3136, max_pixels=3136)
        free = SamplingParams(max_new_tokens=40, ignore_eos=True)
        alone = await tiny_engine.run_to_completion(prompt, free)
        constrained = [
            await tiny_engine.prepare(
                SamplingParams(max_new_tokens=400, temperature=1.0, seed=s, structure=json_schema_output(RECEIPT))
            )
            for s in range(3)
        ]
        together = await asyncio.gather(
            tiny_engine.run_to_completion(prompt, free),
            *(tiny_engine.run_to_completion(prompt, p) for p in constrained),
        )
        return alone, together

    alone, (free, *constrained) = asyncio.run(run())
    assert free.text == alone.text and free.completion_tokens == 40
    for done in constrained:
        jsonschema.validate(json.loads(done.text), RECEIPT)


# --- refused ---------------------------------------------------------------------------------------


def bad_request(client: openai.OpenAI, **kwargs) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"messages": ASK, "max_tokens": 4, **GREEDY, **kwargs})
    return info.value


def test_an_unsupported_schema_keyword_is_a_400_naming_it(client: openai.OpenAI) -> None:
    error = bad_request(
        client, response_format=schema_format({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    )
    assert "uniqueItems" in error.message and error.body["param"].startswith("response_format")


def test_hostile_schemas_are_refused_before_compiling(client: openai.OpenAI) -> None:
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    assert "SNARK_MAX_SCHEMA_DEPTH" in bad_request(client, response_format=schema_format(deep)).message
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(3000)}}
    assert "SNARK_MAX_SCHEMA_BYTES" in bad_request(client, response_format=schema_format(huge)).message
    long_array = {"type": "array", "items": {"type": "integer"}, "minItems": 10**9}
    assert "minItems" in bad_request(client, response_format=schema_format(long_array)).message


def test_tool_requests_that_cannot_work_are_400s(client: openai.OpenAI) -> None:
    assert (
        "not in tools"
        in bad_request(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}).message
    )
    assert "needs tools" in bad_request(client, tool_choice="required").message
    assert (
        'tool_choice is "none", "auto", "required"'
        in bad_request(client, tools=[WEATHER], tool_choice="sometimes").message
    )
    assert (
        "cannot constrain one answer together"
        in bad_request(client, tools=[WEATHER], response_format={"type": "json_object"}).message
    )
    twice = bad_request(client, tools=[WEATHER, WEATHER])
    assert "unique" in twice.message
    history = ASK + [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}
            ],
        }
    ]
    assert "JSON object" in bad_request(client, messages=history + ASK, tools=[WEATHER]).message


def test_tools_are_bounded_together(client: openai.OpenAI) -> None:
    def tool(name: str) -> dict:
        parameters = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100}}}
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    client.chat.completions.create(
        messages=ASK, max_tokens=2, tools=[tool("one")], tool_choice="none", **GREEDY
    )  # alone: fine
    error = bad_request(client, tools=[tool("one"), tool("two")])  # together they compile into one grammar
    assert "all tools' schemas together" in error.message and error.body["param"] == "tools[1].function.parameters"
    not_an_object = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    assert "must describe an object" in bad_request(client, tools=[not_an_object]).message


def test_stop_strings_cannot_cut_a_constrained_answer(client: openai.OpenAI) -> None:
    error = bad_request(client, response_format=schema_format(RECEIPT), stop=["}"])
    assert error.body["param"] == "stop"


def test_offered_tools_not_called_give_the_same_content_streamed_or_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(messages=ASK, max_tokens=12, tools=[WEATHER], **GREEDY)
    stream = client.chat.completions.create(messages=ASK, max_tokens=12, tools=[WEATHER], stream=True, **GREEDY)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.tool_calls is None and streamed == whole.choices[0].message.content
