"""Tool calls parsed out of generated text: whole, and streamed as OpenAI chunk deltas."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from snark.structured.tool_calls import ToolCallDelta, ToolCallStream, new_call_id, parse_tool_calls
from snark.values import ToolCall


def counting_ids():
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def parse(text: str, known: set[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    return parse_tool_calls(text, known=known, make_id=counting_ids())


def block(name: str, arguments: str) -> str:
    """A call exactly as Snark's tool grammar writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


WEATHER = block("get_weather", '{"city": "Paris"}')
TIME = block("get_time", '{"zone": "CET"}')
TRICKY_ARGUMENTS = '{"code": "if (x) { y(\\"}\\"); }", "nested": {"a": [1, {"b": "}{"}]}, "tag": "</tool_call>"}'

WELL_FORMED = {
    "one call": WEATHER,
    "two calls": WEATHER + "\n" + TIME,
    "text before": "Let me check.\n" + WEATHER,
    "text around": "First.\n" + WEATHER + "\nthen\n" + TIME + "\nDone.",
    "tricky strings": block("run", TRICKY_ARGUMENTS),
    "unicode": "Météo à Zürich ☀️\n" + block("get_weather", '{"city": "Zürich", "note": "\\u00fc 日本"}'),
    "loose whitespace": '<tool_call>{ "name" :"get_weather",\n\t"arguments":{ "city" : "Paris" } }</tool_call>',
    "empty arguments": block("ping", "{}"),
    "no calls": "Just an answer, with <b>markup</b> and a <tool in the middle.",
    "malformed kept": "<tool_call>\n{not json}\n</tool_call>\n" + WEATHER,
    "angle brackets": "a < b <tool_ and <tool_call done",
    "blank": "  \n ",
}


def test_one_call():
    assert parse(WEATHER) == (None, [ToolCall("call_0", "get_weather", '{"city": "Paris"}')])


def test_two_calls_in_order():
    content, calls = parse(WEATHER + "\n" + TIME)
    assert content is None
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_0", "get_weather", '{"city": "Paris"}'),
        ("call_1", "get_time", '{"zone": "CET"}'),
    ]


def test_text_around_calls_is_content():
    content, calls = parse("First.\n" + WEATHER + "\nthen\n" + TIME + "\nDone.\n")
    assert content == "First.\n\nthen\n\nDone."
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_braces_quotes_and_closing_tag_inside_strings():
    content, calls = parse(block("run", TRICKY_ARGUMENTS))
    assert content is None
    assert calls[0].arguments == TRICKY_ARGUMENTS
    assert json.loads(calls[0].arguments)["tag"] == "</tool_call>"


def test_unicode_arguments_kept_as_generated():
    arguments = '{"city": "Zürich", "note": "\\u00fc 日本"}'
    content, calls = parse("Météo ☀️\n" + block("get_weather", arguments))
    assert content == "Météo ☀️"
    assert calls[0].arguments == arguments  # not re-serialized: the stream sent this very text
    assert json.loads(calls[0].arguments) == {"city": "Zürich", "note": "ü 日本"}


def test_whitespace_around_arguments_is_trimmed():
    content, calls = parse('<tool_call>{ "name" :"f",\n"arguments":\n  {"a": 1}  \n}</tool_call>')
    assert (content, calls[0].name, calls[0].arguments) == (None, "f", '{"a": 1}')


@pytest.mark.parametrize(
    "body",
    [
        "{not json}",
        '{"name": "f", "arguments": {"a": tru}}',  # braces balance, JSON does not
        '{"name": "f", "arguments": "{}"}',  # arguments must be an object
        '{"name": 3, "arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"arguments": {}, "name": "f"}',  # keys in the order the template asks for
        '{"name": "f", "parameters": {}}',  # "parameters" is not Qwen's key
        '{"name": "f", "arguments": {}, "extra": 1}',
        '["f", {}]',
    ],
)
def test_malformed_block_stays_content(body):
    text = f"Before.\n<tool_call>\n{body}\n</tool_call>\nAfter."
    assert parse(text) == (text, [])


def test_malformed_block_does_not_hide_the_next_call():
    text = "<tool_call>\n{oops}\n</tool_call>\n" + WEATHER
    content, calls = parse(text)
    assert content == "<tool_call>\n{oops}\n</tool_call>"
    assert [c.name for c in calls] == ["get_weather"]


def test_unknown_name_stays_content():
    content, calls = parse(WEATHER + "\n" + TIME, known={"get_time"})
    assert content == WEATHER
    assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize(
    "cut", [len("<tool_c"), len('<tool_call>\n{"name": "get_wea'), len(WEATHER) - 20, len(WEATHER) - 3]
)
def test_call_cut_off_by_the_length_limit_stays_content(cut):
    text = "Checking.\n" + WEATHER[:cut]
    assert parse(text) == (text, [])


def test_call_ids_look_like_openai_ids():
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    _, calls = parse_tool_calls(WEATHER + TIME)
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


# --- streaming ------------------------------------------------------------------------------------


def stream(chunks: list[str], known: set[str] | None = None) -> list:
    parser = ToolCallStream(known=known, make_id=counting_ids())
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk)]
    return pieces + parser.finish(), parser


def accumulate(pieces: list) -> tuple[str | None, list[ToolCall]]:
    """Content and calls the way a client rebuilds them: arguments concatenated per index."""
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: dict[int, dict] = {}
    for piece in (p.to_openai() for p in pieces if isinstance(p, ToolCallDelta)):
        call = calls.setdefault(piece["index"], {"arguments": ""})
        if "id" in piece:
            assert piece["type"] == "function" and piece["function"]["arguments"] == ""
            call.update(id=piece["id"], name=piece["function"]["name"])
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
        call["arguments"] += piece["function"]["arguments"]
    return content or None, [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_stream_split_anywhere_agrees_with_the_whole_parse(name):
    text = WELL_FORMED[name]
    expected = parse(text)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for chunks in splits:
        pieces, parser = stream(chunks)
        assert accumulate(pieces) == expected, chunks
        assert parser.calls == expected[1], chunks


@pytest.mark.parametrize(
    "body",
    [
        "{not json}",
        '{"name": "f", "arguments": "{}"}',
        '{"name": 3, "arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "bad \\q escape", "arguments": {}}',
        '{"arguments": {}, "name": "f"}',
        '{"name": "f", "parameters": {}}',
        '["f", {}]',
    ],
)
def test_stream_keeps_a_block_that_is_no_call_as_content(body):
    # Decided before the stream commits to a call, so the stream agrees with the whole parse.
    text = f"Before.\n<tool_call>\n{body}\n</tool_call>\nAfter.\n" + WEATHER
    expected = parse(text)
    assert expected[0] == f"Before.\n<tool_call>\n{body}\n</tool_call>\nAfter."
    for chunks in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        assert accumulate(stream(chunks)[0]) == expected, chunks


def test_stream_respects_known_names():
    text = WEATHER + "\n" + TIME
    pieces, parser = stream(list(text), known={"get_time"})
    assert accumulate(pieces) == parse(text, known={"get_time"})
    assert [c.name for c in parser.calls] == ["get_time"]


def test_content_goes_out_at_once_and_only_a_possible_tag_waits():
    parser = ToolCallStream(make_id=counting_ids())
    assert parser.feed("Hello wor") == ["Hello wor"]
    assert parser.feed("ld <tool") == ["ld"]  # "<tool" might open a call; the blank waits for text
    assert parser.feed("s>") == [" <tools>"]
    assert parser.feed(" <tool_call") == []
    assert parser.finish() == [" <tool_call"]


def test_stream_announces_the_name_then_streams_exactly_the_arguments():
    parser = ToolCallStream(make_id=counting_ids())
    assert parser.feed('<tool_call>\n{"name": "get_wea') == []
    assert parser.feed('ther", "argu') == []
    first = parser.feed('ments": {"ci')
    assert [p.to_openai() for p in first] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"ci'}},
    ]
    assert parser.calls == []
    assert parser.feed('ty": "}"') == [ToolCallDelta(0, 'ty": "}"')]  # a brace in a string ends nothing
    assert parser.feed("}}\n</tool_") == [ToolCallDelta(0, "}")]  # never the call's "}" nor the tag
    assert parser.calls == [ToolCall("call_0", "get_weather", '{"city": "}"}')]
    assert parser.feed("call>\nAll done.") == ["All done."]
    assert parser.finish() == []


def test_stream_cut_off_inside_arguments_leaves_the_call_unfinished():
    pieces, parser = stream(list("Checking.\n" + WEATHER[: WEATHER.index("Paris") + 2]))
    content, calls = accumulate(pieces)
    assert content == "Checking."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Pa')]  # sent as it came
    assert parser.calls == []  # not complete: the finish_reason stays "length"


def test_stream_cut_off_before_the_name_is_content():
    text = "Checking.\n" + WEATHER[:25]
    assert accumulate(stream(list(text))[0]) == (text, [])


def test_stream_call_missing_only_its_closing_tag_is_complete():
    pieces, parser = stream(list(WEATHER[: -len("\n</tool_call>") + 4]))
    assert accumulate(pieces) == (None, [ToolCall("call_0", "get_weather", '{"city": "Paris"}')])
    assert parser.calls == [ToolCall("call_0", "get_weather", '{"city": "Paris"}')]


def test_stream_text_after_the_arguments_that_is_no_envelope_is_content_again():
    pieces, parser = stream(['<tool_call>{"name": "f", "arguments": {"a": 1}} and then some text'])
    assert accumulate(pieces) == ("and then some text", [ToolCall("call_0", "f", '{"a": 1}')])


def test_openai_client_accumulates_the_same_calls():
    text = "Let me look.\n" + WEATHER + "\n" + block("run", TRICKY_ARGUMENTS)
    parser = ToolCallStream(make_id=counting_ids())
    state = ChatCompletionStreamState()
    for pieces in [parser.feed(char) for char in text] + [parser.finish()]:
        for piece in pieces:
            delta = {"content": piece} if isinstance(piece, str) else {"tool_calls": [piece.to_openai()]}
            state.handle_chunk(chunk(delta))
    state.handle_chunk(chunk({}, finish_reason="tool_calls"))
    message = state.get_final_completion().choices[0].message
    content, calls = parse(text)
    assert message.content == content
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (c.id, c.name, c.arguments) for c in calls
    ]


def chunk(delta: dict, finish_reason: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "qwen",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )
