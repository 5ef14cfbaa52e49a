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
from snark.engine.transformers.batching import collate


def pad_token_id(loaded: LoadedModel) -> int:
    """The id that left-pads a batch: the generation config's, else the tokenizer's (as the engine)."""
    generation = loaded.model.generation_config
    return generation.pad_token_id if generation.pad_token_id is not None else loaded.processor.tokenizer.pad_token_id


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
