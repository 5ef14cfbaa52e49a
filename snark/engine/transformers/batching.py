"""Which waiting requests are prefilled together, and how their prompts become one batch.

Both are small pure functions so they can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from snark.engine.request import PromptInputs


def plan_prefill(prompt_lengths: Sequence[int], *, max_prefill_tokens: int, fits: Callable[[int], bool]) -> int:
    """How many of the oldest waiting requests join the running batch at this step.

    ``prompt_lengths`` are the waiting prompts' lengths in arrival order (images included: each image
    is already expanded to its tokens). They are prefilled as one left-padded batch, so the step
    computes ``rows x longest`` prompt positions; that stays within ``max_prefill_tokens`` (running
    rows wait for the prefill, so this bounds their stall), except that the oldest request always
    goes: alone, and in chunks when it is longer than that. ``fits(n)`` says whether the first ``n`` fit the KV cache budget.

    Strictly first come, first served: a request that does not fit is not overtaken by a smaller
    one behind it, so a long prompt waiting for memory cannot starve.
    """
    count, longest = 0, 0
    for rows, length in enumerate(prompt_lengths, start=1):
        longest = max(longest, length)
        if count and rows * longest > max_prefill_tokens:
            break
        if not fits(rows):
            break
        count = rows
    return count


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
