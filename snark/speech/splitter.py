"""Cut a streamed answer into sentences as its text arrives, so each can be spoken before the rest exists.

    splitter = SentenceSplitter()
    for delta in deltas:
        for sentence in splitter.feed(delta): speak(sentence)
    for sentence in splitter.flush(): speak(sentence)

A sentence is released only once what follows it is known ("Dr. Smith" and "3.5" must not be cut at
their periods, and a period followed by a lowercase word ends nothing), so a candidate end waits for
the next non-space character. Line breaks always end a sentence (list items, headings). A long run
without an end is cut at a clause or word boundary, so audio never waits for the whole answer; the
first piece is cut shorter than the rest because its length is the wait before anything is heard,
and the limit doubles piece by piece from there.
"""

from __future__ import annotations

import re

# A candidate end: terminal punctuation, optional closing quotes/brackets/emphasis, then whitespace.
# CJK full-width enders need no space after them ("好。然后").
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]*_]*\s+|[。！？]+[」』”’）)]*\s*")
# Words after which a period does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs mt fig no approx dept est e.g i.e cf al".split())
# "1." / "- 2)" at the start of a line: a list marker, not a sentence of its own.
_LIST_MARKER = re.compile(r"^\s*(?:[-*+>#]\s*)*\d{1,9}[.)]$")
_CLAUSE_BREAKS = (", ", "; ", ": ", "，", "、", "；", "：")

FIRST_MAX_CHARS = 40  # a phrase a voice speaks in 2-3 s, synthesized in a fraction of that
MAX_CHARS = 250


def _ends_sentence(text: str, start: int, end: re.Match[str]) -> bool:
    if _LIST_MARKER.match(text[start : end.start() + 1]):
        return False
    if text[end.start()] != ".":
        return True  # ! ? … 。 always end a sentence
    following = text[end.end() : end.end() + 1]
    if following.islower():  # "3 p.m. today", "etc. and": a new sentence starts with a capital
        return False
    words = text[start : end.start()].split()
    word = words[-1].lower().lstrip("(\"'*_") if words else ""
    is_initial = len(word) == 1 and word.isalpha()  # "J. R. Tolkien"
    return not (word in _ABBREVIATIONS or is_initial)


def _cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` (longer than ``limit``): after the last clause break in the second half
    of the window, else at the last space, else (one unbroken run, e.g. CJK) at ``limit``."""
    for mark in _CLAUSE_BREAKS:
        cut = text[:limit].rfind(mark)
        if cut >= limit // 2:
            return cut + 1  # keep the comma with the first piece
    cut = text[: limit + 1].rfind(" ")  # a space right at the limit is a fine cut too
    return cut if cut > 0 else limit


class SentenceSplitter:
    """Incremental sentence splitting of one answer: ``feed`` deltas, then ``flush`` once."""

    def __init__(self, *, max_chars: int = MAX_CHARS, first_max_chars: int = FIRST_MAX_CHARS) -> None:
        if max_chars < 1 or first_max_chars < 1:
            raise ValueError("max_chars and first_max_chars must be at least 1")
        self.max_chars = max_chars
        self.first_max_chars = first_max_chars
        self._pending = ""  # text of the current line not yet released
        self._released = 0

    def feed(self, text: str) -> list[str]:
        """Sentences completed by ``text``, in order; the unfinished rest is kept for later."""
        self._pending += text
        *lines, self._pending = re.split(r"\r\n|\r|\n", self._pending)
        sentences = []
        for line in lines:
            sentences += self._take(line, final=True)
        return sentences + self._take_partial()

    def flush(self) -> list[str]:
        """Everything still held: the answer has ended."""
        line, self._pending = self._pending, ""
        return self._take(line, final=True)

    def _limit(self) -> int:
        # The first piece is short so audio starts early; each later one may be twice as long as the
        # one before, so it is synthesized while its predecessor plays (synthesis runs faster than
        # real time), up to max_chars.
        return min(self.max_chars, self.first_max_chars << min(self._released, 16))

    def _take_partial(self) -> list[str]:
        sentences, self._pending = self._split(self._pending, final=False)
        return sentences

    def _take(self, line: str, *, final: bool) -> list[str]:
        return self._split(line, final=final)[0]

    def _split(self, line: str, *, final: bool) -> tuple[list[str], str]:
        """(sentences released from ``line``, the unfinished rest). ``final``: nothing follows ``line``."""
        sentences, start = [], 0
        for end in _SENTENCE_END.finditer(line):
            if not final and end.end() >= len(line):
                break  # what follows decides: "Dr." + " Smith", "3." + "5"
            if _ends_sentence(line, start, end):
                sentences += self._wrapped(line[start : end.end()], final=True)[0]
                start = end.end()
        more, rest = self._wrapped(line[start:], final=final)
        return sentences + more, rest

    def _wrapped(self, text: str, *, final: bool) -> tuple[list[str], str]:
        """Cut ``text`` into pieces within the limit; unless ``final``, keep the short tail."""
        pieces = []
        while len(text.strip()) > self._limit():
            text = text.lstrip()  # not rstrip: a trailing space still separates the next delta's word
            cut = _cut_point(text, self._limit())
            pieces += self._release(text[:cut])
            text = text[cut:]
        if final:
            return pieces + self._release(text), ""
        return pieces, text

    def _release(self, piece: str) -> list[str]:
        piece = piece.strip()
        if not piece:
            return []
        self._released += 1
        return [piece]


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """All sentences of a complete ``text``, each at most ``max_chars`` characters."""
    splitter = SentenceSplitter(max_chars=max_chars, first_max_chars=max_chars)
    return splitter.feed(text) + splitter.flush()
