"""Token ids -> their own text and exact bytes, on the real Qwen2 tokenizer of the tiny checkpoint."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from snark.engine.token_text import TokenTexts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café 🙂 𝄞 日本語", "  two  spaces\n\ttab"])
def test_the_bytes_of_a_texts_tokens_join_into_its_bytes(tokenizer, text):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(text)
    assert b"".join(texts(i)[1] for i in ids) == text.encode()
    for token_id in ids:  # the text alone is the tokenizer's own decoding of the token alone
        assert texts(token_id)[0] == tokenizer.decode([token_id])


def test_special_tokens_are_their_own_text_and_ids_past_the_vocabulary_are_empty(tokenizer):
    texts = TokenTexts(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert texts(end) == ("<|im_end|>", b"<|im_end|>")
    assert texts(len(tokenizer) + 100) == ("", b"")


def test_a_piece_of_a_character_reads_as_a_replacement_character(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("𝄞")
    assert len(ids) > 1  # the vocabulary splits this character
    pieces = [texts(i) for i in ids]
    assert b"".join(data for _, data in pieces) == "𝄞".encode()
    assert all("\ufffd" in text for text, _ in pieces)
    entry = texts.entry(ids[0], -0.5, ((ids[0], -0.5), (ids[1], -2.0)))
    assert entry.token_bytes == pieces[0][1] and entry.top[1] == (ids[1], pieces[1][0], -2.0)
