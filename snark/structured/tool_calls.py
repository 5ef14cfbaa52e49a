"""Tool calls parsed out of Qwen2.5's generated text, whole (``parse_tool_calls``) and streamed
(``ToolCallStream``).

Qwen2.5 calls a tool the Hermes way, after optional plain text::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

What counts as a call (both parsers use the same matchers below, so they agree on well-formed text):
``<tool_call>``, JSON whitespace, ``{"name": STRING, "arguments": OBJECT}`` with keys in that order
(the order Qwen's chat template asks for and Snark's tool grammar forces), JSON whitespace,
``</tool_call>``. The name must be non-empty and, when ``known`` is given, one of the offered tools;
the arguments must parse with ``json.loads``. ``"parameters"`` in place of ``"arguments"`` is not a
call: the template never asks for it (vLLM's Hermes parser reads only ``"arguments"`` too).

Anything else is text: a ``<tool_call>`` that does not start a call stays in the content verbatim
(tag included) and parsing resumes right after its tag, so no text is ever lost; a call cut off by the
length limit is therefore content too.

``arguments`` is the model's own text of the arguments object, from its ``{`` to its ``}``, not
re-serialized: the stream sends that text piece by piece as it is generated and cannot take it back,
so the whole parse keeps the same text and both answers agree.

Where the two differ, on malformed text only: the stream commits to a call once it has read the
name and the ``{`` that opens the arguments, and cannot take back what it sent. After that, a call
whose arguments object closes counts as a call (in ``calls``) even if the arguments are not valid JSON
or the closing ``}`` / ``</tool_call>`` is missing (text after the arguments that is not that envelope
goes back to being content); a call cut off inside its arguments stays unfinished: its pieces were
sent, as OpenAI sends a call that ``max_tokens`` cuts, it is not in ``calls``, and the request's
finish_reason ("length") tells the client.
"""

from __future__ import annotations

import enum
import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass

from snark.values import ToolCall

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# --- matching a fixed token sequence against text that may still be growing -------------------------


class _Match(enum.Enum):
    FULL = "full"
    PARTIAL = "partial"  # the text ended before the sequence did: more text may still complete it
    FAILED = "failed"


_SPACE = object()  # any run of JSON whitespace, possibly empty
_STRING = object()  # one JSON string, decoded
_JSON_SPACE = " \t\r\n"

# Up to and including the "{" that opens the arguments object.
_HEADER = (
    _SPACE,
    "{",
    _SPACE,
    '"name"',
    _SPACE,
    ":",
    _SPACE,
    _STRING,
    _SPACE,
    ",",
    _SPACE,
    '"arguments"',
    _SPACE,
    ":",
    _SPACE,
    "{",
)
# What follows the arguments object: the call object's "}" and the closing tag.
_ENVELOPE = (_SPACE, "}", _SPACE, CLOSE_TAG)


def _match_sequence(text: str, pos: int, tokens: tuple) -> tuple[_Match, int, list[str]]:
    """Match ``tokens`` at ``text[pos:]``. Returns the outcome, the position reached (after the
    sequence when FULL, where the failing token starts when FAILED) and the decoded strings."""
    strings: list[str] = []
    for token in tokens:
        if token is _SPACE:
            while pos < len(text) and text[pos] in _JSON_SPACE:
                pos += 1
        elif token is _STRING:
            if pos == len(text):
                return _Match.PARTIAL, pos, strings
            if text[pos] != '"':
                return _Match.FAILED, pos, strings
            end = _string_end(text, pos)
            if end is None:
                return _Match.PARTIAL, pos, strings
            try:
                strings.append(json.loads(text[pos:end]))
            except ValueError:  # a bad escape or a raw control character
                return _Match.FAILED, pos, strings
            pos = end
        else:
            available = text[pos : pos + len(token)]
            if available == token:
                pos += len(token)
            elif token.startswith(available) and pos + len(available) == len(text):
                return _Match.PARTIAL, pos, strings
            else:
                return _Match.FAILED, pos, strings
    return _Match.FULL, pos, strings


def _blank_end(text: str, pos: int) -> int:
    """The position after the run of JSON blanks at ``text[pos:]``."""
    while pos < len(text) and text[pos] in _JSON_SPACE:
        pos += 1
    return pos


def _string_end(text: str, quote: int) -> int | None:
    """The position after the JSON string opening at ``text[quote]``; None if it has not closed yet."""
    i = quote + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


class _ObjectEndFinder:
    """Finds where a JSON object closes, fed its text in pieces from its ``{``. Braces inside strings
    (and escaped quotes inside those) do not count; brackets never change brace depth."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, chunk: str) -> int | None:
        """The position in ``chunk`` just after the object's closing ``}``; None if still open."""
        for i, char in enumerate(chunk):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _is_offered(name: str, known: set[str] | None) -> bool:
    return bool(name) and (known is None or name in known)


# --- the whole text at once ---------------------------------------------------------------------


def parse_tool_calls(
    text: str, *, known: set[str] | None = None, make_id: Callable[[], str] = new_call_id
) -> tuple[str | None, list[ToolCall]]:
    """The content (the text outside the calls, stripped; None if empty) and the calls, in order."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (tag := text.find(OPEN_TAG, pos)) != -1:
        content.append(text[pos:tag])
        call = _call_after_tag(text, tag + len(OPEN_TAG), known)
        if call is None:
            content.append(OPEN_TAG)
            pos = tag + len(OPEN_TAG)
        else:
            name, arguments, pos = call
            calls.append(ToolCall(id=make_id(), name=name, arguments=arguments))
    content.append(text[pos:])
    return "".join(content).strip() or None, calls


def _call_after_tag(text: str, start: int, known: set[str] | None) -> tuple[str, str, int] | None:
    """(name, arguments, end of the block) when a complete call follows an opening tag."""
    outcome, args_start, strings = _match_sequence(text, start, _HEADER)
    if outcome is not _Match.FULL or not _is_offered(strings[0], known):
        return None
    args_start -= 1  # the header ends with the arguments' "{"
    length = _ObjectEndFinder().feed(text[args_start:])
    if length is None:
        return None
    arguments = text[args_start : args_start + length]
    try:
        json.loads(arguments)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than a parser goes: not a call
        return None
    outcome, end, _ = _match_sequence(text, args_start + length, _ENVELOPE)
    return (strings[0], arguments, end) if outcome is _Match.FULL else None


# --- streamed, as OpenAI's chat.completion.chunk deltas -------------------------------------------


@dataclass(frozen=True)
class ToolCallDelta:
    """One item of OpenAI's ``choices[0].delta.tool_calls``. A call's first delta carries its id and
    name (and empty arguments); the ones after it carry pieces of its arguments text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Piece = str | ToolCallDelta  # content text, or a tool-call delta


class _State(enum.Enum):
    TEXT = "text"
    HEADER = "header"  # after <tool_call>, until the name and the arguments' "{" are read
    ARGUMENTS = "arguments"  # a call was announced: its arguments text goes out as it comes
    ENVELOPE = "envelope"  # after the arguments object: the call's "}" and </tool_call>


class ToolCallStream:
    """Turns generated text deltas into OpenAI streaming pieces: ``feed`` each delta, ``finish`` once.

    Content goes out as soon as it cannot be the start of ``<tool_call>``, except that blank text waits
    for the next non-blank text: the streamed content then equals ``parse_tool_calls``'s stripped
    content, and an answer that is only tool calls streams no content at all."""

    def __init__(self, *, known: set[str] | None = None, make_id: Callable[[], str] = new_call_id) -> None:
        self._known = known
        self._make_id = make_id
        self._state = _State.TEXT
        self._pending = ""  # received text not yet sent or decided
        self._blanks = 0  # leading JSON blanks of _pending already seen, in the header or envelope
        self._held_space = ""  # blank content waiting for non-blank content
        self._content_started = False
        self._announced = 0  # calls whose first delta went out
        self._call = ("", "")  # the current call's id and name
        self._arguments = ""  # the current call's arguments text so far
        self._object_end = _ObjectEndFinder()
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls complete so far (their arguments object closed), in order."""
        return list(self._calls)

    def feed(self, delta: str) -> list[Piece]:
        self._pending += delta
        return self._advance(at_end=False)

    def finish(self) -> list[Piece]:
        """The rest, once the text is complete (see the module doc for a call cut off at the end)."""
        return self._advance(at_end=True)

    def _advance(self, at_end: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._step(out, at_end):
            pass
        return _merge_content(out)

    def _step(self, out: list[Piece], at_end: bool) -> bool:
        """Move on by what the pending text decides; False when it must wait for more text."""
        if self._state is _State.TEXT:
            tag = self._pending.find(OPEN_TAG)
            if tag == -1:
                keep = 0 if at_end else _partial_tag_length(self._pending)
                self._send_content(self._pending[: len(self._pending) - keep], out)
                self._pending = self._pending[len(self._pending) - keep :]
                return False
            self._send_content(self._pending[:tag], out)
            self._pending = self._pending[tag + len(OPEN_TAG) :]
            self._state, self._blanks = _State.HEADER, 0
            return True

        if self._state is _State.HEADER:
            # The header starts with blanks: skip the ones already seen, so a model writing a long run
            # of them after <tool_call> costs one pass, not one pass per delta over all of them.
            self._blanks = _blank_end(self._pending, self._blanks)
            outcome, end, strings = _match_sequence(self._pending, self._blanks, _HEADER)
            if outcome is _Match.PARTIAL and not at_end:
                return False
            if outcome is _Match.FULL and _is_offered(strings[0], self._known):
                self._call = (self._make_id(), strings[0])
                out.append(ToolCallDelta(self._announced, "", id=self._call[0], name=self._call[1]))
                self._announced += 1
                self._arguments, self._object_end = "", _ObjectEndFinder()
                self._pending = self._pending[end - 1 :]  # from the arguments' "{"
                self._state = _State.ARGUMENTS
            else:  # not a call: the tag is text, and what follows it is read as text again
                self._send_content(OPEN_TAG, out)
                self._state = _State.TEXT
            return True

        if self._state is _State.ARGUMENTS:
            length = self._object_end.feed(self._pending)
            piece = self._pending if length is None else self._pending[:length]
            if piece:
                self._arguments += piece
                out.append(ToolCallDelta(self._announced - 1, piece))
            self._pending = self._pending[len(piece) :]
            if length is None:
                return False  # at the end, the call stays unfinished
            call_id, name = self._call
            self._calls.append(ToolCall(id=call_id, name=name, arguments=self._arguments))
            self._state, self._blanks = _State.ENVELOPE, 0
            return True

        self._blanks = _blank_end(self._pending, self._blanks)  # the envelope starts with blanks too
        outcome, end, _ = _match_sequence(self._pending, self._blanks, _ENVELOPE)
        if outcome is _Match.PARTIAL and not at_end:
            return False
        # FULL: the envelope is done; FAILED: what does not fit it is text again; PARTIAL at the end:
        # the envelope was cut off (only blanks, "}" and part of the closing tag: nothing to keep).
        self._pending = "" if outcome is _Match.PARTIAL else self._pending[end:]
        self._state = _State.TEXT
        return True

    def _send_content(self, text: str, out: list[Piece]) -> None:
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        if body:
            out.append(body)


def _partial_tag_length(text: str) -> int:
    """How long the end of ``text`` is a proper start of ``<tool_call>`` (to hold it back)."""
    for length in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if OPEN_TAG.startswith(text[-length:]):
            return length
    return 0


def _merge_content(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged
