"""One token's own text and exact bytes, for log-probabilities (both engines).

Qwen2's tokenizer is byte-level BPE: a token is a run of bytes, which may end inside a UTF-8
character (an emoji or a CJK character often spans two or three tokens). ``token_bytes`` are those
exact bytes, read from the vocabulary through the byte-level alphabet (GPT-2's byte <-> character
table), so a client can join the bytes of consecutive tokens into their text. ``token`` is the bytes
decoded with ``errors="replace"``: what ``tokenizer.decode([id])`` gives, and what vLLM reports for a
token alone (a piece of a character reads as U+FFFD). Added tokens (``<|im_end|>``, ...) are their
own text. An id past the tokenizer's vocabulary (the model's embedding is padded beyond it) has no
text and no bytes.

Lookups are cached by id: a step asks for the same few thousand tokens again and again.
"""

from __future__ import annotations

from snark.values import TokenLogprob


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others are shifted past 255 so that every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


_ALPHABET = _byte_alphabet()


class TokenTexts:
    """Token id -> (its text, its exact bytes), for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._look_up(token_id)
        return found

    def _look_up(self, token_id: int) -> tuple[str, bytes]:
        added = self._added.get(token_id)
        if added is not None:
            return added, added.encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", b""
        if all(char in _ALPHABET for char in piece):
            data = bytes(_ALPHABET[char] for char in piece)
        else:  # not a byte-level piece: trust the tokenizer's own decoding
            data = self._tokenizer.decode([token_id]).encode()
        return data.decode("utf-8", errors="replace"), data

    def entry(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> TokenLogprob:
        """A ``TokenLogprob`` for ``token_id``; ``top``: its alternatives as ``(id, logprob)``, most likely first."""
        text, data = self(token_id)
        return TokenLogprob(
            token_id=token_id,
            token=text,
            token_bytes=data,
            logprob=logprob,
            top=tuple((index, self(index)[0], value) for index, value in top),
        )
