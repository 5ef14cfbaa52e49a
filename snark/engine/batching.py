"""Which waiting requests run together, and how their prompts become one batch.

Both are small pure functions so they can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from snark.engine.request import PromptInputs

T = TypeVar("T")


def select_batch(
    waiting: Sequence[T],
    lengths: Sequence[int],
    *,
    max_batch_size: int,
    max_length_ratio: float = 2.0,
    length_slack: int = 128,
) -> list[int]:
    """Indices (into ``waiting``, oldest first) of the requests to run next.

    The oldest request always goes first, so nothing starves. Others join in arrival order when
    their prompt length is close to the oldest's (within ``max_length_ratio`` or ``length_slack``
    tokens), because left padding makes every row pay for the longest prompt in the batch.
    """
    if not waiting:
        return []
    anchor = lengths[0]
    chosen = [0]
    for index in range(1, len(waiting)):
        if len(chosen) >= max_batch_size:
            break
        length = lengths[index]
        short, long_ = min(anchor, length), max(anchor, length)
        if long_ - short <= length_slack or long_ <= short * max_length_ratio:
            chosen.append(index)
    return chosen


def bucket_size(n: int, max_batch_size: int) -> int:
    """Round a batch size up to a power of two (capped): compiled decode steps see few shapes."""
    size = 1
    while size < n:
        size *= 2
    return min(max(size, n), max(max_batch_size, n))


def collate(prompts: Sequence[PromptInputs], *, pad_token_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token ids into one batch and concatenate the images in row order.

    Returns every input Qwen2.5-VL's ``generate`` needs: ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (1 on image tokens) and, when any row has images, ``pixel_values`` and
    ``image_grid_thw``.
    """
    width = max(p.num_tokens for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = width - prompt.num_tokens
        input_ids[row, start:] = torch.tensor(prompt.input_ids, dtype=torch.long)
        attention_mask[row, start:] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_token_id).long() * attention_mask,
    }
    with_images = [p for p in prompts if p.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
        batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
    return batch
