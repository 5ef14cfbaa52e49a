"""The ceilings, with no engine at all, on the model the engine serves:

* ``raw_generate``: one left-padded ``model.generate`` call;
* ``continuous_batching``: transformers' ``generate_batch`` on token ids (text only).
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig

from snark.engine.loader import LoadedModel
from snark.engine.request import PromptInputs


def pad_token_id(loaded: LoadedModel) -> int:
    """The id that left-pads a batch: the generation config's, else the tokenizer's (as the engine)."""
    generation = loaded.model.generation_config
    return generation.pad_token_id if generation.pad_token_id is not None else loaded.processor.tokenizer.pad_token_id


def collate(prompts: list[PromptInputs], *, pad_token_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token ids into one batch and concatenate the images in row order: every input
    Qwen2.5-VL's ``generate`` needs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, 1 on image
    tokens, and with images ``pixel_values`` and ``image_grid_thw``)."""
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_generate(loaded: LoadedModel, prompts: list[PromptInputs], *, max_new_tokens: int, pad_token_id: int) -> float:
    """Seconds for one ``model.generate`` over ``prompts`` as a left-padded batch, exactly
    ``max_new_tokens`` each. End-of-turn is switched off by giving no end-of-turn ids, which costs
    nothing per step (``min_new_tokens`` would check the whole vocabulary every step and slow this
    ceiling down)."""
    inputs = collate(prompts, pad_token_id=pad_token_id, image_token_id=loaded.model.config.image_token_id)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=pad_token_id
    )
    _sync(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, generation_config=config)
    _sync(loaded.device)
    seconds = time.perf_counter() - started
    if out.shape[1] - inputs["input_ids"].shape[1] != max_new_tokens:
        raise RuntimeError("raw generate did not produce max_new_tokens tokens per row")
    return seconds


def continuous_batching(
    loaded: LoadedModel, prompts: list[PromptInputs], *, max_new_tokens: int, pad_token_id: int
) -> tuple[float, int]:
    """transformers' own continuous batching (``generate_batch``) on the prompts' token ids: text
    only, as it takes no images. The first call builds and warms its manager, which is kept for
    the timed second call, then destroyed. Returns (seconds, output tokens)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id
    )
    ids = [p.input_ids for p in prompts]
    try:
        loaded.model.generate_batch(inputs=ids, generation_config=config, persistent_manager=True)
        _sync(loaded.device)
        started = time.perf_counter()
        outputs = loaded.model.generate_batch(inputs=ids, generation_config=config, persistent_manager=True)
        _sync(loaded.device)
        seconds = time.perf_counter() - started
    finally:
        loaded.model.destroy_cached_continuous_batching_manager()
    return seconds, sum(len(o.generated_tokens) for o in outputs.values())
