"""Turn a model's markdown answer into plain sentences a voice can read.

Without this the voice reads "asterisk asterisk", URLs and emoji names aloud, and one long answer
becomes one long synthesis call, so the first audio arrives only when the whole answer is done.
"""

from __future__ import annotations

import html
import re
import unicodedata

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
    line = _SPACES.sub(" ", line).strip()
    return _SPACE_BEFORE_PUNCTUATION.sub("", line)


def clean_for_speech(text: str) -> str:
    """Strip markdown, HTML and emoji, keeping the words (code inside fences included).

    Lines stay separate (``split_sentences`` treats a line break as a sentence end, so list items and
    headings get a pause); blank lines and fence markers are dropped.
    """
    text = html.unescape(unicodedata.normalize("NFC", text))
    lines = (_clean_line(line) for line in text.splitlines() if not _FENCE.match(line))
    return "\n".join(line for line in lines if line)


# --- sentences -----------------------------------------------------------------------------------
# A candidate end: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+")
# Words after which a period does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs mt fig no approx dept est e.g i.e cf al".split())
_WRAP_POINTS = (", ", "; ", ": ", " ")  # best place to cut an over-long sentence, in order


def _ends_sentence(text: str, end: re.Match[str]) -> bool:
    if text[end.start()] != ".":
        return True  # ! ? … always end a sentence
    following = text[end.end() : end.end() + 1]
    if following.islower():  # "3 p.m. today", "etc. and": a new sentence starts with a capital
        return False
    words = text[: end.start()].split()
    word = words[-1].lower().lstrip("(\"'") if words else ""
    is_initial = len(word) == 1 and word.isalpha()  # "J. R. Tolkien"
    return not (word in _ABBREVIATIONS or is_initial)


def _split_line(line: str) -> list[str]:
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(line):
        if _ends_sentence(line, end):
            sentences.append(line[start : end.end()].strip())
            start = end.end()
    sentences.append(line[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _wrap(sentence: str, max_chars: int) -> list[str]:
    pieces = []
    while len(sentence) > max_chars:
        window = sentence[: max_chars + 1]  # a space right at the limit is a fine cut too
        cut = -1
        for point in _WRAP_POINTS:
            cut = window.rfind(point)
            if cut > 0:
                cut += len(point.rstrip())  # keep the comma with the first piece
                break
        if cut <= 0:
            cut = max_chars  # one unbroken token longer than the limit: cut it
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    pieces.append(sentence)
    return [piece for piece in pieces if piece]


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """Split into sentences (at . ! ? … and line breaks), each at most ``max_chars`` characters.

    Over-long sentences are wrapped at the last comma, semicolon, colon or space that fits, so the
    engine never gets one huge input and streaming keeps a steady pace.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    return [
        piece
        for line in text.splitlines()
        for sentence in _split_line(line.strip())
        for piece in _wrap(sentence, max_chars)
    ]
