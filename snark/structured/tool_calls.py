"""Tool calls parsed out of Qwen2.5's generated text by one parser, ``ToolCallStream``: fed the text
delta by delta as it is generated, or the whole text at once (``parse_tool_calls``).

Qwen2.5 calls a tool the Hermes way, after optional plain text::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

What counts as a call: ``<tool_call>``, JSON whitespace, ``{"name": STRING, "arguments": OBJECT}`` with
keys in that order (the order Qwen's chat template asks for and Snark's tool grammar forces), JSON
whitespace, ``</tool_call>``. The name must be non-empty and, when ``known`` is given, one of the offered
tools; the arguments must parse with ``json.loads``. ``"parameters"`` in place of ``"arguments"`` is not
a call: the template never asks for it (vLLM's Hermes parser reads only ``"arguments"`` too).

Anything else is text: a ``<tool_call>`` that does not start a call stays in the content verbatim (tag
included) and reading resumes right after its tag, so no text is ever lost. ``arguments`` is the
model's own text of the arguments object, from its ``{`` to its ``}``, not re-serialized. The content
is the text outside the calls, stripped: blank text waits for the next non-blank text, so an answer
that is only tool calls has no content at all.

The parser knows whether more text may come, and that is the only thing that makes it decide
differently:

- **The whole text** (``feed(text, final=True)``; ``parse_tool_calls``): a call is decided before
  anything of it is sent, so a call cut off by the length limit, or one whose arguments are not JSON or
  whose ``}`` / ``</tool_call>`` is missing, is content.
- **Piece by piece** (``feed`` each delta, then ``finish``): content goes out as soon as it cannot be
  the start of ``<tool_call>``, and a call goes out as soon as its name and the ``{`` that opens its
  arguments are read; its arguments text follows piece by piece as it is generated, and what was sent
  cannot be taken back. So on malformed text the stream keeps what it sent: a call whose arguments
  object closes counts as a call (in ``calls``) even if the arguments are not valid JSON or the closing
  ``}`` / ``</tool_call>`` is missing (text after the arguments that is not that envelope goes back to
  being content); a call cut off inside its arguments stays unfinished: its pieces were sent, as OpenAI
  sends a call that ``max_tokens`` cuts, it is not in ``calls``, and the request's finish_reason
  ("length") tells the client. On well-formed text both ways give the same content and calls, however
  the text is cut into deltas.

Each character is read a bounded number of times however it is cut into deltas: the matchers resume
where they stopped, so a long string or run of blanks fed piece by piece is not read again at every
delta (a tag that turns out to be no call is the exception: what followed it is read again as text).
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


def parse_tool_calls(
    text: str, *, known: set[str] | None = None, make_id: Callable[[], str] = new_call_id
) -> tuple[str | None, list[ToolCall]]:
    """The content (the text outside the calls, stripped; None if empty) and the calls, in order: the
    stream parser fed the whole text at once."""
    stream = ToolCallStream(known=known, make_id=make_id)
    content = "".join(piece for piece in stream.feed(text, final=True) if isinstance(piece, str))
    return content or None, stream.calls


# --- matching a fixed token sequence against text that may still be growing -------------------------


class _Match(enum.Enum):
    FULL = "full"
    PARTIAL = "partial"  # the text ended before the sequence did: more text may still complete it
    FAILED = "failed"


_SPACE = object()  # any run of JSON whitespace, possibly empty (never the last token of a sequence)
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


class _SequenceMatcher:
    """Matches ``tokens`` at ``text[start:]``, where ``text`` only grows between calls: each ``match``
    resumes where the last one stopped (inside a run of blanks or a string too), so text fed piece by
    piece is read once. ``pos`` is where the match has reached (after the sequence once FULL);
    ``strings`` the strings decoded so far."""

    def __init__(self, tokens: tuple, start: int = 0) -> None:
        self._tokens = tokens
        self._index = 0  # the token being matched, which starts at ``pos``
        self._scan = start  # inside a string: the next character to read
        self.pos = start
        self.strings: list[str] = []

    def match(self, text: str) -> _Match:
        while self._index < len(self._tokens):
            token = self._tokens[self._index]
            if token is _SPACE:
                while self.pos < len(text) and text[self.pos] in _JSON_SPACE:
                    self.pos += 1
                if self.pos == len(text):
                    return _Match.PARTIAL  # more blanks may come
            elif token is _STRING:
                outcome = self._match_string(text)
                if outcome is not _Match.FULL:
                    return outcome
            else:
                available = text[self.pos : self.pos + len(token)]
                if available != token:
                    if token.startswith(available) and self.pos + len(available) == len(text):
                        return _Match.PARTIAL
                    return _Match.FAILED
                self.pos += len(token)
            self._index += 1
        return _Match.FULL

    def _match_string(self, text: str) -> _Match:
        if self.pos == len(text):
            return _Match.PARTIAL
        if text[self.pos] != '"':
            return _Match.FAILED
        scan = max(self._scan, self.pos + 1)
        while scan < len(text) and text[scan] != '"':
            scan += 2 if text[scan] == "\\" else 1  # an escape may end past the text: read on from there
        self._scan = scan
        if scan >= len(text):
            return _Match.PARTIAL
        try:
            self.strings.append(json.loads(text[self.pos : scan + 1]))
        except ValueError:  # a bad escape or a raw control character
            return _Match.FAILED
        self.pos = scan + 1
        return _Match.FULL


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


def _completes_call(text: str, arguments_start: int) -> bool:
    """Whether the arguments object opening at ``text[arguments_start]`` closes, is JSON, and is
    followed by the call's envelope: with the whole text in hand, a call is decided before it is sent."""
    length = _ObjectEndFinder().feed(text[arguments_start:])
    if length is None:
        return False
    try:
        json.loads(text[arguments_start : arguments_start + length])
    except (ValueError, RecursionError):  # not JSON, or nested deeper than a parser goes: not a call
        return False
    return _SequenceMatcher(_ENVELOPE, arguments_start + length).match(text) is _Match.FULL


# --- the parser, as OpenAI's chat.completion.chunk deltas -----------------------------------------


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
    """Turns generated text into OpenAI streaming pieces: ``feed`` each delta, then ``finish`` once; or
    ``feed(text, final=True)`` once with the whole text (see the module doc for how they differ)."""

    def __init__(self, *, known: set[str] | None = None, make_id: Callable[[], str] = new_call_id) -> None:
        self._known = known
        self._make_id = make_id
        self._state = _State.TEXT
        self._pending = ""  # received text not yet sent or decided
        self._matcher = _SequenceMatcher(_HEADER)  # in the header or envelope: its progress over _pending
        self._held_space: list[str] = []  # blank content waiting for non-blank content
        self._content_started = False
        self._ended = False
        self._announced = 0  # calls whose first delta went out
        self._call = ("", "")  # the current call's id and name
        self._arguments: list[str] = []  # the current call's arguments text so far
        self._object_end = _ObjectEndFinder()
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls complete so far (their arguments object closed), in order."""
        return list(self._calls)

    def feed(self, delta: str, *, final: bool = False) -> list[Piece]:
        """The pieces ``delta`` decides. ``final``: no text comes after it (``finish`` is then done too)."""
        if self._ended:
            raise RuntimeError("the text has ended: no delta may follow finish() or a final feed")
        self._pending += delta
        self._ended = final
        out: list[Piece] = []
        while self._step(out, at_end=final):
            pass
        return _merge_content(out)

    def finish(self) -> list[Piece]:
        """The rest, once the text is complete (see the module doc for a call cut off at the end)."""
        return self.feed("", final=True)

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
            self._state, self._matcher = _State.HEADER, _SequenceMatcher(_HEADER)
            return True

        if self._state is _State.HEADER:
            outcome = self._matcher.match(self._pending)
            if outcome is _Match.PARTIAL and not at_end:
                return False
            arguments_start = self._matcher.pos - 1  # the header ends with the arguments' "{"
            if (
                outcome is _Match.FULL
                and _is_offered(self._matcher.strings[0], self._known)
                and (not at_end or _completes_call(self._pending, arguments_start))
            ):
                self._call = (self._make_id(), self._matcher.strings[0])
                out.append(ToolCallDelta(self._announced, "", id=self._call[0], name=self._call[1]))
                self._announced += 1
                self._arguments, self._object_end = [], _ObjectEndFinder()
                self._pending = self._pending[arguments_start:]
                self._state = _State.ARGUMENTS
            else:  # not a call: the tag is text, and what follows it is read as text again
                self._send_content(OPEN_TAG, out)
                self._state = _State.TEXT
            return True

        if self._state is _State.ARGUMENTS:
            length = self._object_end.feed(self._pending)
            piece = self._pending if length is None else self._pending[:length]
            if piece:
                self._arguments.append(piece)
                out.append(ToolCallDelta(self._announced - 1, piece))
            self._pending = self._pending[len(piece) :]
            if length is None:
                return False  # at the end, the call stays unfinished
            call_id, name = self._call
            self._calls.append(ToolCall(id=call_id, name=name, arguments="".join(self._arguments)))
            self._state, self._matcher = _State.ENVELOPE, _SequenceMatcher(_ENVELOPE)
            return True

        outcome = self._matcher.match(self._pending)
        if outcome is _Match.PARTIAL and not at_end:
            return False
        # FULL: the envelope is done; FAILED: what does not fit it is text again; PARTIAL at the end:
        # the envelope was cut off (only blanks, "}" and part of the closing tag: nothing to keep).
        self._pending = "" if outcome is _Match.PARTIAL else self._pending[self._matcher.pos :]
        self._state = _State.TEXT
        return True

    def _send_content(self, text: str, out: list[Piece]) -> None:
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        body = text.rstrip()
        if not body:  # blank: it waits for the next non-blank text (kept in pieces: never re-read)
            self._held_space.append(text)
            return
        out.append("".join(self._held_space) + body)
        self._held_space = [text[len(body) :]]


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
