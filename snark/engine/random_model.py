"""Real-size Qwen2.5-VL architectures with random weights, built in memory without a download.

A benchmark of decode speed needs the real shapes (layers, heads, vocabulary), not the real weights:
``build_random_model("7B")`` builds ``Qwen2_5_VLForConditionalGeneration`` from the values of the
published ``Qwen/Qwen2.5-VL-7B-Instruct`` config.json, with random bf16 weights straight on the GPU.
The tokenizer and processor are the real Qwen2 ones (the tiny checkpoint's), so prompts and images
go through the same path as in production. Answers are noise; lengths are fixed with ``ignore_eos``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from snark.engine.loader import LoadedModel, pick_attention, pick_device
from snark.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported when a model is built, not at start-up
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# Qwen/Qwen2.5-VL-7B-Instruct config.json (transformers 4.41 layout: rope_theta and mrope_section
# at the top level, here under rope_parameters as transformers 5 reads them).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "7B": {
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "max_window_layers": 28,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "use_sliding_window": False,
            "sliding_window": 32768,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    },
}


def published_config(size: str) -> Qwen2_5_VLConfig:
    from transformers import Qwen2_5_VLConfig

    key = size.strip().upper()
    if key not in PUBLISHED_CONFIGS:
        raise ConfigError(f"--random-weights {size!r}: only {', '.join(PUBLISHED_CONFIGS)} is built in.")
    return Qwen2_5_VLConfig(**PUBLISHED_CONFIGS[key])


def decode_weight_bytes(model: Qwen2_5_VLForConditionalGeneration) -> int:
    """Bytes of weights one decode step reads: the language model and its head. The vision tower
    runs in the prefill only. The embedding table is counted whole, as the usual roofline does,
    though a step reads only one row of it per sequence."""
    vision = {id(p) for p in model.model.visual.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in vision)


def meta_model(size: str, dtype: torch.dtype = torch.bfloat16) -> Qwen2_5_VLForConditionalGeneration:
    """The architecture without memory behind it: for counting bytes on any machine."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = published_config(size)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def build_random_model(size: str, *, processor_dir: str | Path, device: str = "auto") -> LoadedModel:
    """The ``size`` architecture with random weights on ``device`` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    target = pick_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    attn = pick_attention(target)
    started = time.perf_counter()
    config = published_config(size)
    torch.manual_seed(0)
    with torch.device(target):  # initialise on the device: seconds on a GPU, not minutes on a CPU
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643]
    )
    processor = AutoProcessor.from_pretrained(str(processor_dir))
    processor.tokenizer.padding_side = "left"
    return LoadedModel(
        model=model,
        processor=processor,
        name=f"random-weight Qwen2.5-VL-{size.strip().upper()}",
        device=target,
        dtype=dtype,
        attn_implementation=attn,
        is_tiny=False,
        load_s=time.perf_counter() - started,
    )
