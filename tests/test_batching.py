"""The batching functions on their own: which requests run together, and how they become a batch."""

from __future__ import annotations

import torch

from snark.engine.batching import bucket_size, collate, select_batch
from snark.engine.request import PromptInputs

PAD, IMAGE = 0, 9


# --- select_batch ---------------------------------------------------------------------------------
def test_select_batch_takes_similar_lengths_in_arrival_order_up_to_the_limit():
    lengths = [40, 35, 50, 45, 38]
    assert select_batch(lengths, lengths, max_batch_size=3) == [0, 1, 2]
    assert select_batch(lengths, lengths, max_batch_size=16) == [0, 1, 2, 3, 4]


def test_select_batch_always_starts_with_the_oldest_request():
    lengths = [20000, 30, 30, 30]
    chosen = select_batch(lengths, lengths, max_batch_size=16)
    assert chosen[0] == 0
    # A long document takes at most one short companion: a second would triple its prefill.
    assert chosen == [0, 1]


def test_select_batch_mixes_text_and_image_rows_of_ordinary_size():
    # 16 requests: short questions and image prompts (a 1280-token image is the default cap).
    lengths = [30, 1300, 28, 45, 1310, 33] + [40] * 10
    assert select_batch(lengths, lengths, max_batch_size=16) == list(range(16))


def test_select_batch_skips_a_row_whose_padding_breaks_both_bounds_but_takes_later_ones():
    lengths = [30] * 8 + [5000] + [31, 29]
    chosen = select_batch(lengths, lengths, max_batch_size=16, max_padding_tokens=1000)
    assert chosen == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]


def test_select_batch_padding_bound_is_what_decides():
    # Two rows: 100 and 700 tokens pad 600 <= 800 real tokens: together even with no slack.
    assert select_batch([0, 1], [100, 700], max_batch_size=4, max_padding_tokens=0) == [0, 1]
    # Three rows of 100 and one of 700: padding 1800 > 1000 real, and over a slack of 1000.
    assert select_batch([0, 1, 2, 3], [100, 100, 100, 700], max_batch_size=4, max_padding_tokens=1000) == [0, 1, 2]
    assert select_batch([0, 1, 2, 3], [100, 100, 100, 700], max_batch_size=4, max_padding_tokens=1800) == [0, 1, 2, 3]


def test_select_batch_of_nothing_and_of_one():
    assert select_batch([], [], max_batch_size=4) == []
    assert select_batch(["a", "b"], [10, 10], max_batch_size=1) == [0]


# --- bucket_size ------------------------------------------------------------------------------------
def test_bucket_size_rounds_up_to_powers_of_two_capped_at_the_max_batch():
    assert [bucket_size(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [bucket_size(n, 12) for n in (5, 8, 9, 12)] == [8, 8, 12, 12]
    assert bucket_size(1, 1) == 1


# --- collate ------------------------------------------------------------------------------------------
def _image_prompt(ids: list[int], patches: int, grid: tuple[int, int, int], fill: float) -> PromptInputs:
    return PromptInputs(
        input_ids=ids,
        pixel_values=torch.full((patches, 4), fill),
        image_grid_thw=torch.tensor([grid]),
    )


def test_collate_left_pads_text_rows_with_a_matching_attention_mask():
    batch = collate([PromptInputs([5, 6, 7]), PromptInputs([8])], pad_token_id=PAD, image_token_id=IMAGE)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert "pixel_values" not in batch and "image_grid_thw" not in batch


def test_collate_mixes_text_and_image_rows_keeping_image_order():
    first = _image_prompt([1, IMAGE, IMAGE, 2], patches=8, grid=(1, 2, 4), fill=1.0)
    text = PromptInputs([3, 4])
    second = _image_prompt([IMAGE, 5], patches=4, grid=(1, 2, 2), fill=2.0)
    batch = collate([first, text, second], pad_token_id=PAD, image_token_id=IMAGE)

    assert batch["input_ids"].tolist() == [[1, IMAGE, IMAGE, 2], [PAD, PAD, 3, 4], [PAD, PAD, IMAGE, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    # Images are concatenated in row order, so the model matches them to image tokens row by row.
    assert batch["pixel_values"].shape == (12, 4)
    assert batch["pixel_values"][:8].eq(1.0).all() and batch["pixel_values"][8:].eq(2.0).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]


def test_collate_never_marks_padding_as_image_tokens():
    # Even if the pad id were the image id, padded positions are masked out of mm_token_type_ids.
    batch = collate([PromptInputs([IMAGE, 1, 2]), PromptInputs([3])], pad_token_id=IMAGE, image_token_id=IMAGE)
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
