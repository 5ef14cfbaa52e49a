"""``/v1/responses`` through the official ``openai`` client and the OpenAI Agents SDK, on the tiny model.

The tiny model's answers are noise, so these tests check structure and constraints: greedy decoding is
deterministic, so a response equals the chat completion of the same conversation and a streamed
response equals the plain one; a json_schema answer validates because the grammar forced it; a
required tool_choice always yields a call whose arguments match the tool's schema, which makes a
tool round trip (call, output, answer) deterministic enough to test.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    ToolsToFinalOutputResult,
    function_tool,
)
from pydantic import BaseModel, Field

from snark.app import create_app
from snark.engine.request import GenerationRequest, RequestState
from tests.conftest import image_server as serve_image
from tests.conftest import serve, start_engine, wait_until
from tests.http.test_openai_api import data_uri, png
from tests.http.test_structured_outputs import RECEIPT, TIME, TOOL_SCHEMAS, WEATHER
from tests.videos import make_video

GREEDY = {"model": "snark", "temperature": 0}
# Chat's tools in the Responses form: {"type": "function", "name", "parameters", ...}, no "function" level.
TOOLS = [{"type": "function", **WEATHER["function"]}, {"type": "function", **TIME["function"]}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as session:
        yield session


def chat_text(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    reply = client.chat.completions.create(messages=messages, max_tokens=max_tokens, **GREEDY)
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def check_calls(output: list, names: set[str]) -> list:
    """The output's function_call items (all of it), each naming an offered tool with valid arguments."""
    calls = [item for item in output if item.type == "function_call"]
    assert calls and len(calls) == len(output), output
    for call in calls:
        assert call.name in names and call.call_id.startswith("call_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[call.name])
    return calls


# --- text, images, videos --------------------------------------------------------------------------


def test_a_text_response_is_the_chat_answer_in_openais_shape(client: openai.OpenAI) -> None:
    response = client.responses.create(input="Hello", instructions="Answer briefly.", max_output_tokens=8, **GREEDY)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == "snark-tiny-random-qwen2.5-vl" and response.model_extra["store"] is False
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    # instructions are a system message before the input: the prompt and the answer are chat's.
    text, prompt_tokens = chat_text(
        client, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"}], 8
    )
    assert response.output_text == part.text == text
    usage = response.usage
    assert usage.input_tokens == prompt_tokens and usage.input_tokens_details.cached_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens" and usage.output_tokens == 8
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(input="Hi", max_output_tokens=3, extra_body={"ignore_eos": True}, **GREEDY)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3


def test_settings_are_echoed_and_store_is_answered_false(client: openai.OpenAI) -> None:
    response = client.responses.create(
        input="Hi",
        max_output_tokens=2,
        store=True,  # answered, not stored
        metadata={"ticket": "42"},
        user="someone",
        reasoning={"effort": None},
        include=["reasoning.encrypted_content"],
        truncation="disabled",
        **GREEDY,
    )
    assert response.model_extra["store"] is False and response.metadata == {"ticket": "42"}
    assert response.temperature == 0 and response.tool_choice == "none" and response.tools == []
    assert response.text.format.type == "text" and response.parallel_tool_calls is True


@pytest.fixture(scope="module")
def picture_url() -> Iterator[str]:
    with serve_image(png((56, 84), (30, 10, 200)), "image/png") as url:
        yield f"{url}/picture.png"


def test_images_by_url_and_data_uri_cost_what_chat_counts(client: openai.OpenAI, picture_url: str) -> None:
    content = [
        {"type": "input_image", "image_url": picture_url, "detail": "auto"},
        {"type": "input_image", "image_url": data_uri((64, 64)), "detail": "original"},
        {"type": "input_text", "text": "What is this?"},
    ]
    response = client.responses.create(input=[{"role": "user", "content": content}], max_output_tokens=4, **GREEDY)
    chat_parts = [
        {"type": "image_url", "image_url": {"url": picture_url}},
        {"type": "image_url", "image_url": {"url": data_uri((64, 64))}},
        {"type": "text", "text": "What is this?"},
    ]
    text, prompt_tokens = chat_text(client, [{"role": "user", "content": chat_parts}], 4)
    assert response.usage.input_tokens == prompt_tokens > 20 and response.output_text == text


def test_a_video_part_is_chats_video(http: httpx.Client) -> None:
    video = "data:video/mp4;base64," + base64.b64encode(make_video(16, fps=8)).decode()
    part = {"type": "input_video", "video_url": video, "fps": 1}
    body = {"input": [{"role": "user", "content": [part, {"type": "input_text", "text": "What happens?"}]}]}
    response = http.post("/v1/responses", json={**body, "max_output_tokens": 4, **GREEDY}).json()
    chat_part = {"type": "video_url", "video_url": {"url": video, "fps": 1}}
    chat = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": [chat_part, {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 4,
            **GREEDY,
        },
    ).json()
    assert response["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] > 20


# --- structured outputs and tools --------------------------------------------------------------------


class Weather(BaseModel):
    city: str = Field(max_length=12)
    sky: Literal["sun", "rain", "snow"]
    celsius: int = Field(ge=-40, le=50)


def test_json_schema_and_json_object_answers_parse(client: openai.OpenAI) -> None:
    text_format = {"format": {"type": "json_schema", "name": "receipt", "schema": RECEIPT, "strict": True}}
    response = client.responses.create(input="A receipt, please.", text=text_format, max_output_tokens=400, **GREEDY)
    assert response.status == "completed" and response.text.format.name == "receipt"
    jsonschema.validate(json.loads(response.output_text), RECEIPT)
    parsed = client.responses.parse(input="The weather?", text_format=Weather, max_output_tokens=200, **GREEDY)
    assert isinstance(parsed.output_parsed, Weather)
    anything = client.responses.create(
        input="JSON, please.", text={"format": {"type": "json_object"}}, max_output_tokens=100, **GREEDY
    )
    if anything.status == "completed":  # an object can go on past the budget; what was written is one
        assert isinstance(json.loads(anything.output_text), dict)


def test_a_required_tool_call_and_its_output_round_trip(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(
        input=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=200, **GREEDY
    )
    [call] = check_calls(first.output, {"get_weather", "get_time"})
    assert first.status == "completed" and first.tool_choice == "required"
    assert [tool.name for tool in first.tools] == ["get_weather", "get_time"]
    # The call and its output go back as input (Snark stores nothing): the model answers from them.
    history = [*ask, *first.output]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "sun"})}
    second = client.responses.create(
        input=[*history, result], tools=TOOLS, tool_choice="none", max_output_tokens=6, **GREEDY
    )
    assert [item.type for item in second.output] == ["message"]
    # The prompt is chat's for the same history: an assistant turn with the call, then a tool turn.
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    chat_history = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result["output"]},
    ]
    text, prompt_tokens = chat_text(client, chat_history, 6)
    assert second.usage.input_tokens == prompt_tokens and second.output_text == text
    named = client.responses.create(
        input=ask,
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
        max_output_tokens=200,
        **GREEDY,
    )
    check_calls(named.output, {"get_time"})
    assert named.tool_choice.name == "get_time"


# --- streaming -------------------------------------------------------------------------------------


def test_a_streamed_answer_follows_openais_event_order(client: openai.OpenAI) -> None:
    options = {"input": "The weather?", "max_output_tokens": 200, **GREEDY}
    with client.responses.stream(text_format=Weather, **options) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 3 and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == final.output_text
    assert isinstance(final.output_parsed, Weather) and final.usage.output_tokens > 3
    plain = client.responses.parse(text_format=Weather, **options)
    assert plain.output_text == final.output_text  # greedy: the stream and the plain answer agree


def test_a_streamed_call_sends_its_arguments_in_pieces(client: openai.OpenAI) -> None:
    options = {"input": "Weather?", "tools": TOOLS, "tool_choice": "required", "max_output_tokens": 200, **GREEDY}
    with client.responses.stream(parallel_tool_calls=False, **options) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    pieces = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(pieces),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    [call] = check_calls(final.output, {"get_weather", "get_time"})
    assert events[2].item.type == "function_call" and events[2].item.call_id == call.call_id
    assert "".join(pieces) == events[-3].arguments == call.arguments
    plain = client.responses.create(parallel_tool_calls=False, **options)
    assert plain.output[0].arguments == call.arguments and plain.output[0].name == call.name


def test_a_stream_cut_at_max_output_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        input="Hi", max_output_tokens=4, stream=True, extra_body={"ignore_eos": True}, **GREEDY
    )
    events = list(stream)
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.incomplete_details.reason == "max_output_tokens" and final.usage.output_tokens == 4
    assert final.output[0].status == "incomplete" and final.output[0].content[0].text == final.output_text


# --- the OpenAI Agents SDK ---------------------------------------------------------------------------


@function_tool
def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
    """
    return json.dumps({"city": city, "sky": "sun"})


def test_an_agent_calls_its_tool_and_gets_the_result_back(base_url: str) -> None:
    """The Agents SDK's default model (OpenAIResponsesModel) running an agent on Snark: a required
    tool_choice makes each turn a call; the second turn sees the first call and its result."""
    turns: list[list[Any]] = []

    def after_two_calls(context, results) -> ToolsToFinalOutputResult:  # type: ignore[no-untyped-def]
        turns.append([result.output for result in results])
        return ToolsToFinalOutputResult(is_final_output=len(turns) == 2, final_output=results[0].output)

    async def run(streamed: bool) -> Any:
        openai_client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        agent = Agent(
            name="forecaster",
            instructions="Use the tool.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="snark", openai_client=openai_client),
            model_settings=ModelSettings(
                tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=200
            ),
            tool_use_behavior=after_two_calls,
            reset_tool_choice=False,
        )
        config = RunConfig(tracing_disabled=True)
        if not streamed:
            return await Runner.run(agent, "The weather in Paris?", run_config=config)
        run = Runner.run_streamed(agent, "The weather in Paris?", run_config=config)
        async for _ in run.stream_events():
            pass
        return run

    for streamed in (False, True):
        turns.clear()
        result = asyncio.run(run(streamed))
        assert len(turns) == 2 and result.final_output == turns[1][0]
        assert json.loads(result.final_output)["sky"] == "sun"
        items = [item.type for item in result.new_items]
        assert items == ["tool_call_item", "tool_call_output_item"] * 2
        assert len(result.raw_responses) == 2 and all(r.usage.output_tokens > 0 for r in result.raw_responses)


# --- refused and malformed requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "look up"}]}, "tools[0].name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_object"}}, "extra_body": {"stop": ["}"]}}, "stop"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "[1]"}]},
            "input[0].arguments",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ],
)
def test_what_snark_cannot_honour_is_a_400_naming_the_field(client: openai.OpenAI, options: dict, param: str) -> None:
    request = {"input": "Hi", "max_output_tokens": 2, **GREEDY, **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**request)
    assert info.value.param == param and info.value.type == "invalid_request_error", info.value.message
    assert "messages[" not in info.value.message and ".function." not in info.value.message  # no chat names


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "data:image/png;base64,!!!"])
def test_an_image_that_cannot_load_names_its_input_item(client: openai.OpenAI, url: str) -> None:
    content = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What is it?"}]
    history = [{"role": "user", "content": "Hi"}, {"role": "user", "content": content}]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input=history, instructions="Look.", max_output_tokens=2, **GREEDY)
    assert info.value.param == "input[1].content[0].image_url"
    assert "messages" not in info.value.message


def test_a_streamed_bad_request_is_a_400_before_any_event(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.responses.create(input="Hi", background=True, stream=True, **GREEDY)


# --- a one-row engine: leaving and timing out mid-stream ------------------------------------------------

LONG = 2000  # tokens: far more than the tests wait for, so only cancellation ends the row early


@pytest.fixture(scope="module")
def one_row(tiny_model_dir, test_settings, speaker) -> Iterator[tuple[Any, list[GenerationRequest]]]:
    engine = start_engine(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)
    ended: list[GenerationRequest] = []
    engine.add_listener(ended.append)  # runs in the worker thread as each request ends
    try:
        yield engine, ended
    finally:
        engine.stop()


def long_cancelled(ended: list[GenerationRequest]) -> GenerationRequest | None:
    return next((r for r in ended if r.params.max_new_tokens == LONG and r.state is RequestState.CANCELLED), None)


def test_leaving_a_stream_cancels_its_row(one_row, test_settings, speaker) -> None:  # type: ignore[no-untyped-def]
    engine, ended = one_row
    ended.clear()
    body = {"input": "Hi", "max_output_tokens": LONG, "stream": True, "ignore_eos": True, **GREEDY}
    with serve(create_app(test_settings, engine=engine, speaker=speaker)) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/responses", json=body) as response:
            deltas = 0
            for line in response.iter_lines():
                deltas += line == "event: response.output_text.delta"
                if deltas == 2:
                    break
            assert engine.num_running == 1 and not ended  # tokens arrive while the row runs
    cancelled = wait_until(lambda: long_cancelled(ended), "the engine to cancel the row")
    assert cancelled.completion_tokens < LONG


def test_a_stream_that_times_out_ends_with_an_error_and_failed(one_row, test_settings, speaker) -> None:  # type: ignore[no-untyped-def]
    engine, ended = one_row
    ended.clear()
    app = create_app(test_settings.model_copy(update={"request_timeout_s": 0.5}), engine=engine, speaker=speaker)
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.responses.create(
            input="Hi", max_output_tokens=LONG, stream=True, extra_body={"ignore_eos": True}, **GREEDY
        )
        events = list(stream)
        wait_until(lambda: long_cancelled(ended), "the timed-out stream's row to be cancelled")
    error, failed = events[-2], events[-1]
    assert error.type == "error" and error.code == "request_timeout" and "SNARK_REQUEST_TIMEOUT_S" in error.message
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.message == error.message
    assert [event.sequence_number for event in events] == list(range(len(events)))
