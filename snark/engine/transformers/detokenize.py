"""Token ids -> text deltas, one token at a time, with stop strings.

Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens; decoding each token alone
would emit U+FFFD halves. ``IncrementalDetokenizer`` re-decodes a short window and only emits text
once it no longer ends in a replacement character (the scheme vLLM and TGI use).
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window re-decoded for context
        self.read_offset = 0  # ids before this are already emitted
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset]): changes only when the offsets move

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(self.prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(self.prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(self.prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = ""
        return delta


class StopMatcher:
    """Finds stop strings in streamed text and holds back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # text not yet released to the client

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit). After a hit, text from the
        stop string on is dropped, as in the OpenAI API."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        keep = self._partial_suffix_len()
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _partial_suffix_len(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:size]):
                    best = size
                    break
        return best
