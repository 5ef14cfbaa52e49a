"""The tool-call parser on many generated texts: the whole-text parse against an independent reference
(regular expressions and ``json``'s own decoder), a stream cut anywhere against the whole parse, and
the parser's work on long texts fed piece by piece (counted in executed lines, never timed)."""

from __future__ import annotations

import itertools
import json
import re
import sys

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from snark.structured import tool_calls
from snark.structured.tool_calls import CLOSE_TAG, OPEN_TAG, ToolCallDelta, ToolCallStream, parse_tool_calls

PROPERTIES = settings(max_examples=200, derandomize=True, deadline=None)


def counting_ids():
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def parse(text: str, known: set[str] | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text, known=known, make_id=counting_ids())
    return content, [(call.name, call.arguments) for call in calls]


# --- the reference: what counts as a call, written another way ------------------------------------

_WS = r"[ \t\r\n]*"
_HEADER_RE = re.compile(
    rf'{_WS}\{{{_WS}"name"{_WS}:{_WS}("(?:[^"\\]|\\.)*"){_WS},{_WS}"arguments"{_WS}:{_WS}(?=\{{)', re.DOTALL
)
_ENVELOPE_RE = re.compile(rf"{_WS}\}}{_WS}{re.escape(CLOSE_TAG)}")


def reference(text: str, known: set[str] | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls, pos = [], [], 0
    while (tag := text.find(OPEN_TAG, pos)) != -1:
        content.append(text[pos:tag])
        call = _reference_call(text, tag + len(OPEN_TAG), known)
        if call is None:
            content.append(OPEN_TAG)
            pos = tag + len(OPEN_TAG)
        else:
            name, arguments, pos = call
            calls.append((name, arguments))
    content.append(text[pos:])
    return "".join(content).strip() or None, calls


def _reference_call(text: str, start: int, known: set[str] | None) -> tuple[str, str, int] | None:
    header = _HEADER_RE.match(text, start)
    if header is None:
        return None
    try:
        name = json.loads(header.group(1))
        _, end = json.JSONDecoder().raw_decode(text, header.end())
    except (ValueError, RecursionError):
        return None
    envelope = _ENVELOPE_RE.match(text, end)
    if not name or (known is not None and name not in known) or envelope is None:
        return None
    return name, text[header.end() : end], envelope.end()


# --- generated texts ----------------------------------------------------------------------------

NAMES = ["get_weather", "f", "run"]
_blanks = st.text(alphabet=" \t\r\n", max_size=3)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(alphabet='ab{}[]"\\</>:,é\n', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='ab{}"', max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_arguments = st.builds(
    json.dumps,
    st.dictionaries(st.text(alphabet='ab{}"\\', max_size=4), _json_values, max_size=3),
    ensure_ascii=st.booleans(),
    separators=st.sampled_from([(", ", ": "), (",", ":")]),
)


@st.composite
def call_blocks(draw) -> str:
    """A well-formed call, with blanks wherever JSON allows them."""
    b = [draw(_blanks) for _ in range(9)]
    name, arguments = json.dumps(draw(st.sampled_from(NAMES))), draw(_arguments)
    return (
        f'{OPEN_TAG}{b[0]}{{{b[1]}"name"{b[2]}:{b[3]}{name}{b[4]},{b[5]}"arguments"{b[6]}:{b[7]}'
        f"{arguments}{b[8]}}}{draw(_blanks)}{CLOSE_TAG}"
    )


_text_pieces = st.text(alphabet='ab <>_/{}"\\:\n é☀', max_size=6) | st.sampled_from(
    ["<tool_", "<tool_call", "</tool_call>", "}", '"}', "{", "tool_call>"]
)
# Pieces of calls, whole and broken, mixed with text: most texts below are malformed somewhere.
_fragments = (
    _text_pieces
    | call_blocks()
    | st.sampled_from(
        [
            OPEN_TAG,
            '{"name": ',
            '"name"',
            '"arguments"',
            ": ",
            ", ",
            '"get_weather"',
            '""',
            '"bad \\q"',
            "\\",
            '{"a": 1}',
            '{"a": tru}',
            '"parameters"',
            "\x01",
        ]
    )
)
any_texts = st.lists(_fragments, max_size=30).map("".join)
known_sets = st.sampled_from([None, {"get_weather"}, {"f", "run"}])


@st.composite
def well_formed_texts(draw) -> tuple[str, int]:
    """Text and calls, the text holding no <tool_call> but the calls' own; and how many calls."""
    segments = draw(st.lists(st.tuples(st.booleans(), _text_pieces, call_blocks()), max_size=6))
    text = "".join(piece if is_text else block for is_text, piece, block in segments)
    calls = sum(not is_text for is_text, _, _ in segments)
    assume(text.count(OPEN_TAG) == calls)
    return text, calls


def cut(text: str, data) -> list[str]:
    points = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


def accumulate(pieces: list) -> tuple[str | None, list[tuple[str, str]]]:
    """Content and calls the way a client rebuilds them from the pieces."""
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: dict[int, list[str]] = {}
    for piece in (p for p in pieces if isinstance(p, ToolCallDelta)):
        if piece.id is not None:
            calls[piece.index] = [piece.name or "", ""]
        calls[piece.index][1] += piece.arguments
    return content or None, [(name, arguments) for _, (name, arguments) in sorted(calls.items())]


# --- properties ---------------------------------------------------------------------------------


@PROPERTIES
@given(any_texts, known_sets)
def test_whole_parse_agrees_with_the_reference(text, known):
    assert parse(text, known) == reference(text, known)


@PROPERTIES
@given(any_texts, known_sets)
def test_whole_parse_is_the_stream_fed_the_text_as_final(text, known):
    stream = ToolCallStream(known=known, make_id=counting_ids())
    pieces = stream.feed(text, final=True)
    assert accumulate(pieces) == parse(text, known)
    assert [(c.name, c.arguments) for c in stream.calls] == parse(text, known)[1]
    assert_refuses_more(stream)  # the text has ended: nothing may follow it


@PROPERTIES
@given(well_formed_texts(), known_sets, st.data())
def test_well_formed_text_cut_anywhere_streams_the_whole_parse(text_and_calls, known, data):
    text, count = text_and_calls
    whole = parse(text, known)
    if known is None:
        assert len(whole[1]) == count
    stream = ToolCallStream(known=known, make_id=counting_ids())
    pieces = [piece for chunk in cut(text, data) for piece in stream.feed(chunk)] + stream.finish()
    assert accumulate(pieces) == whole
    assert [(c.name, c.arguments) for c in stream.calls] == whole[1]


@PROPERTIES
@given(any_texts, known_sets, st.data())
def test_a_final_last_piece_decides_like_the_whole_parse_when_no_call_began_before_it(text, known, data):
    # Fed in pieces, the stream commits to a call once its header is read; a call whose tag completes only
    # in the final piece is decided with the whole text in hand, as the whole parse decides it.
    first_tag = text.find(OPEN_TAG)
    split = data.draw(st.integers(0, len(text) if first_tag == -1 else first_tag + len(OPEN_TAG) - 1))
    stream = ToolCallStream(known=known, make_id=counting_ids())
    pieces = [piece for chunk in cut(text[:split], data) for piece in stream.feed(chunk)]
    pieces += stream.feed(text[split:], final=True)
    assert accumulate(pieces) == parse(text, known)


def assert_refuses_more(stream: ToolCallStream) -> None:
    try:
        stream.feed("more")
    except RuntimeError:
        return
    raise AssertionError("a stream that has ended took more text")


# --- work on long texts fed piece by piece -------------------------------------------------------


def lines_run(text: str, piece: int = 1) -> int:
    """Lines of the parser's module executed while ``text`` is streamed ``piece`` characters at a time."""
    count = 0

    def line(frame, event, arg):
        nonlocal count
        count += event == "line"
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == tool_calls.__file__ else None

    stream = ToolCallStream(make_id=counting_ids())
    sys.settrace(call)
    try:
        for start in range(0, len(text), piece):
            stream.feed(text[start : start + piece])
        stream.finish()
    finally:
        sys.settrace(None)
    return count


LONG_TEXTS = {
    "an unclosed name": lambda n: OPEN_TAG + '{"name": "' + "a" * n,
    "a name of escapes": lambda n: OPEN_TAG + '{"name": "' + "\\n" * n,
    "blanks inside the header": lambda n: OPEN_TAG + "{" + " " * n + '"name": "f"',
    "blanks after the tag": lambda n: OPEN_TAG + "\n" * n,
    "long arguments": lambda n: OPEN_TAG + '{"name": "f", "arguments": {"a": "' + "b" * n,
    "blanks after the arguments": lambda n: OPEN_TAG + '{"name": "f", "arguments": {}' + " " * n + "}",
    "blank content": lambda n: "Hello" + " \n" * n + "world",
    "plain content": lambda n: "word " * n,
}


def test_long_texts_fed_piece_by_piece_are_read_once():
    for name, make in LONG_TEXTS.items():
        for piece in (1, 3):
            short, long = lines_run(make(300), piece), lines_run(make(600), piece)
            # Twice the text, about twice the work; a parser that re-read its pending text at every delta
            # would do about four times the work.
            assert long < 2.3 * short, (name, piece, short, long)
