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
    max_padding_tokens: int = 32768,
) -> list[int]:
    """Indices (into ``waiting``, oldest first) of the requests to run next.

    ``lengths`` are prompt lengths in tokens, images included (each image is already expanded to its
    tokens), so an image row groups by what it really costs the language model. The oldest request
    always goes first, so nothing starves. Others join in arrival order while the batch's left
    padding (``rows * longest - sum(lengths)``) stays at most the real prompt tokens (padding at
    most doubles the prefill) or at most ``max_padding_tokens``.

    Splitting is the exception on purpose: the worker runs one batch at a time, so a request left
    out waits for the whole batch and then costs a second run of decode steps, while padding costs
    only prefill work and KV-cache memory for the padded positions. The rule bounds that cost:
    padding at most doubles the batch's prompt tokens, or stays under ``max_padding_tokens`` (32768
    tokens are 1.9 GB of KV cache on the 7B). Text and image rows of ordinary sizes therefore
    run together, and a long document takes at most one short companion.
    """
    if not waiting:
        return []
    chosen = [0]
    longest, total = lengths[0], lengths[0]
    for index in range(1, len(waiting)):
        if len(chosen) >= max_batch_size:
            break
        length = lengths[index]
        rows, width, real = len(chosen) + 1, max(longest, length), total + length
        padding = rows * width - real
        if padding <= real or padding <= max_padding_tokens:
            chosen.append(index)
            longest, total = width, real
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
