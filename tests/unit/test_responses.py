"""The Responses API's pure parts, no server and no model: ``input`` items as chat messages, and the
output items and stream events built from generated text (``OutputItems``)."""

from __future__ import annotations

import json

import pytest

from snark.api.response_input import chat_input
from snark.api.response_output import OutputItems
from snark.errors import InvalidRequest

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
TEXT_AND_CALLS = f"Let me look.\n{CALL}\n{CALL.replace('UTC', 'CET')}"


def build(pieces: list[str], *, tools: bool = True, complete: bool = True) -> tuple[list[dict], list[dict]]:
    output = OutputItems({"get_time"} if tools else None)
    events = [event for piece in pieces for event in output.feed(piece)]
    return output.items, events + output.finish(complete=complete)


def shape(items: list[dict]) -> list[tuple]:
    """The items without their random ids."""
    return [
        (item["type"], item["status"], item["content"][0]["text"] if item["type"] == "message" else item["arguments"])
        for item in items
    ]


def test_text_then_calls_become_a_message_and_two_function_calls() -> None:
    items, events = build([TEXT_AND_CALLS])
    assert shape(items) == [
        ("message", "completed", "Let me look."),
        ("function_call", "completed", '{"zone": "UTC"}'),
        ("function_call", "completed", '{"zone": "CET"}'),
    ]
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *["response.output_item.added", "response.function_call_arguments.delta"],
        *["response.function_call_arguments.done", "response.output_item.done"],
        *["response.output_item.added", "response.function_call_arguments.delta"],
        *["response.function_call_arguments.done", "response.output_item.done"],
    ]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert added[1]["item"]["status"] == "in_progress" and added[1]["item"]["arguments"] == ""  # as it was then


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_the_stream_builds_what_the_whole_text_builds(size: int) -> None:
    whole, _ = build([TEXT_AND_CALLS])
    pieces = [TEXT_AND_CALLS[i : i + size] for i in range(0, len(TEXT_AND_CALLS), size)]
    streamed, events = build(pieces)
    assert shape(streamed) == shape(whole)
    for index, item in enumerate(streamed):  # the deltas add up to each item's text
        kind = "response.output_text.delta" if item["type"] == "message" else "response.function_call_arguments.delta"
        deltas = [e["delta"] for e in events if e["type"] == kind and e["output_index"] == index]
        assert "".join(deltas) == shape([item])[0][2]


def test_a_call_closes_as_soon_as_its_arguments_do() -> None:
    output = OutputItems({"get_time"})
    events = output.feed(CALL.removesuffix("\n</tool_call>"))
    assert events[-1]["type"] == "response.output_item.done" and events[-1]["item"]["status"] == "completed"


def test_a_call_cut_by_the_token_limit_is_incomplete() -> None:
    items, events = build([CALL[:60]], complete=False)
    assert shape(items) == [("function_call", "incomplete", CALL[CALL.index('{"zone"') : 60])]
    assert events[-1]["item"]["status"] == "incomplete"


def test_an_answer_with_nothing_in_it_still_has_its_message() -> None:
    items, events = build([], tools=False)
    assert shape(items) == [("message", "completed", "")]
    assert events[-2]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    cut, _ = build(["Hello, wor"], tools=False, complete=False)
    assert shape(cut) == [("message", "incomplete", "Hello, wor")]


def test_without_tools_a_tool_call_tag_is_only_text() -> None:
    items, _ = build([CALL], tools=False)
    assert shape(items) == [("message", "completed", CALL)]


def test_snapshot_shows_the_open_messages_text() -> None:
    output = OutputItems(None)
    output.feed("Half an ans")
    assert output.snapshot()[0]["content"][0]["text"] == "Half an ans" and output.items[0]["content"] == []


# --- input ---------------------------------------------------------------------------------------


def test_instructions_messages_and_a_tool_round_trip_become_chat_messages() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'}
    chat = chat_input(
        "Be brief.",
        [
            {"role": "user", "content": "Time?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
            call,
            {**call, "call_id": "call_2"},
            {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "12:00"}]},
            {"type": "function_call_output", "call_id": "call_2", "output": "13:00"},
        ],
    )
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "tool"]
    assert chat.where == ["instructions", "input[0]", "input[1]", "input[4]", "input[5]"]
    assistant = chat.messages[2]
    assert [c.id for c in assistant.tool_calls or []] == ["call_1", "call_2"]
    assert [(m.tool_call_id, m.content) for m in chat.messages[3:]] == [("call_1", "12:00"), ("call_2", "13:00")]


def test_errors_from_chats_pipeline_name_the_input_fields() -> None:
    chat = chat_input("Look.", [{"role": "user", "content": "Hi"}, {"role": "user", "content": "There"}])
    error = chat.renamed(
        InvalidRequest("messages[2].content[0].image_url.url: bad", param="messages[2].content[0].image_url.url")
    )
    assert (error.message, error.param) == ("input[1].content[0].image_url: bad", "input[1].content[0].image_url")
    assert chat.renamed(InvalidRequest("too many images", param="messages")).param == "input"


def test_an_item_that_is_not_an_object_is_named() -> None:
    with pytest.raises(InvalidRequest) as info:
        chat_input(None, [json.dumps({"role": "user"})])
    assert info.value.param == "input[0]" and "an input item is a message" in info.value.message
