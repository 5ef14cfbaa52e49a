"""The batching functions on their own: which requests are prefilled together, and how they become a batch."""

from __future__ import annotations

import torch

from snark.engine.transformers.batching import collate, plan_prefill
from snark.engine.request import PromptInputs

PAD, IMAGE = 0, 9


# --- plan_prefill -----------------------------------------------------------------------------------
def _always(n: int) -> bool:
    return True


def test_plan_prefill_takes_the_oldest_while_the_padded_prefill_stays_within_the_step_bound():
    assert plan_prefill([40, 35, 50, 45], max_prefill_tokens=1000, fits=_always) == 4
    # 3 rows x 50 = 150 padded positions; a 4th would make 4 x 50 = 200.
    assert plan_prefill([40, 35, 50, 45], max_prefill_tokens=150, fits=_always) == 3


def test_plan_prefill_always_takes_the_oldest_even_when_it_is_long():
    assert plan_prefill([20000, 30, 30], max_prefill_tokens=8192, fits=_always) == 1


def test_plan_prefill_counts_padding_to_the_longest_prompt():
    # A long prompt behind short ones would pad them all: it waits for the next step.
    assert plan_prefill([30, 30, 30, 5000], max_prefill_tokens=8192, fits=_always) == 3


def test_plan_prefill_is_first_come_first_served_under_the_memory_budget():
    # The second request does not fit: the third (which would) does not overtake it.
    assert plan_prefill([10, 5000, 10], max_prefill_tokens=100000, fits=lambda n: n < 2) == 1
    assert plan_prefill([10, 10], max_prefill_tokens=100, fits=lambda n: False) == 0
    assert plan_prefill([], max_prefill_tokens=100, fits=_always) == 0


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
