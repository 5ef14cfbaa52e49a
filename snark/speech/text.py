"""Turn a model's markdown answer into plain sentences a voice can read.

Without this the voice reads "asterisk asterisk", URLs and emoji names aloud, and one long answer
becomes one long synthesis call, so the first audio arrives only when the whole answer is done.
"""

from __future__ import annotations

import html
import re
import unicodedata

from snark.speech.splitter import split_sentences

__all__ = ["clean_for_speech", "split_sentences"]  # split_sentences: one splitting rule for whole and streamed text

# --- markdown, line by line ------------------------------------------------------------------------
_FENCE = re.compile(r"^\s*(```|~~~)")
_HRULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_TABLE_DIVIDER = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_LINE_PREFIX = re.compile(
    r"^\s*(?:>\s*)*"  # blockquote markers, nested or not
    r"(?:#{1,6}\s+"  # heading
    r"|[-*+]\s+(?:\[[ xX]\]\s+)?"  # bullet, with an optional task-list box
    r"|\d{1,9}[.)]\s+)?"  # numbered item
)
_HEADING_TAIL = re.compile(r"\s+#+\s*$")

# --- markdown, inline ----------------------------------------------------------------------------
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^<>\s]+)>")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # needs a tag name, so "a < b > c" survives
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_EMPHASIS = re.compile(r"\*+|~~|`+|(?<!\w)_+|_+(?!\w)")  # keeps snake_case names whole
_SPACES = re.compile(r"[ \t\f\v]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # within a line: a gap, never a character to say (espeak takes no NUL)
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+(?=[.,!?;:](?:\s|$))")  # left where emoji were cut

# Symbols a voice can say; every other "So" (other symbol) character is a pictograph to drop.
_SPOKEN_SYMBOLS = frozenset("°©®™")
_DROPPED_CATEGORIES = frozenset({"So", "Cs", "Co", "Cn", "Cf", "Me"})  # Cf: ZWJ; Me: keycap ring


def _is_pictograph(char: str) -> bool:
    if char in _SPOKEN_SYMBOLS:
        return False
    code = ord(char)
    if 0xFE00 <= code <= 0xFE0F or 0x1F3FB <= code <= 0x1F3FF:  # emoji variation selectors, skin tones
        return True
    return unicodedata.category(char) in _DROPPED_CATEGORIES


def _strip_emphasis(line: str) -> str:
    """Drop emphasis markers outside code spans; code keeps its `*` and `_` ("2 * 3", "__init__")."""
    parts, position = [], 0
    for span in _CODE_SPAN.finditer(line):
        parts += [_EMPHASIS.sub("", line[position : span.start()]), span.group(2)]
        position = span.end()
    parts.append(_EMPHASIS.sub("", line[position:]))
    return "".join(parts)


def _clean_line(line: str) -> str:
    if _HRULE.match(line) or _TABLE_DIVIDER.match(line):
        return ""
    if line.lstrip().startswith("|"):  # a table row: read the cells as a list
        line = ", ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
    line = _LINE_PREFIX.sub("", line, count=1)
    line = _HEADING_TAIL.sub("", line)
    line = _IMAGE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _AUTOLINK.sub(r"\1", line)
    line = _HTML_TAG.sub("", line)
    line = _strip_emphasis(line)
    line = "".join(char for char in line if not _is_pictograph(char))
    line = _SPACES.sub(" ", _CONTROL.sub(" ", line)).strip()
    return _SPACE_BEFORE_PUNCTUATION.sub("", line)


def clean_for_speech(text: str) -> str:
    """Strip markdown, HTML and emoji, keeping the words (code inside fences included).

    Lines stay separate (``split_sentences`` treats a line break as a sentence end, so list items and
    headings get a pause); blank lines and fence markers are dropped.
    """
    text = html.unescape(unicodedata.normalize("NFC", text))
    lines = (_clean_line(line) for line in text.splitlines() if not _FENCE.match(line))
    return "\n".join(line for line in lines if line)
