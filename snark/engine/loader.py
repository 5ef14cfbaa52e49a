"""Loading Qwen2.5-VL weights and processor onto the right device, with clear failures."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from snark.engine.hub import Hub, resolve_checkpoint
from snark.engine.tiny_model import random_weights_build
from snark.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported when a model loads, not at start-up
    from transformers import (
        ProcessorMixin,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "snark-tiny-random-qwen2.5-vl"


def random_model_name(size: str) -> str:
    """What the API calls a random-weight checkpoint of ``size`` (the toy: ``TINY_MODEL_NAME``)."""
    return TINY_MODEL_NAME.replace("tiny", size, 1)


LARGE_ON_CPU_BYTES = 4 * 10**9  # float32 weights past this: warn (the 3B already needs about 15 GB)


@dataclass
class LoadedModel:
    model: Qwen2_5_VLForConditionalGeneration
    processor: ProcessorMixin
    name: str  # what the API reports as "model"
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    is_tiny: bool
    load_s: float

    # transformers types Qwen2_5_VLConfig's sub-configs as ``dict | PreTrainedConfig | None``: what a caller
    # may pass in. Its ``__post_init__`` turns them into these classes, so a built model always has them.
    @property
    def text_config(self) -> Qwen2_5_VLTextConfig:
        """The language model's config (vocabulary, layers, heads)."""
        from transformers import Qwen2_5_VLTextConfig

        config = self.model.config.text_config
        assert isinstance(config, Qwen2_5_VLTextConfig), "Qwen2_5_VLConfig builds its text_config"
        return config

    @property
    def vision_config(self) -> Qwen2_5_VLVisionConfig:
        """The vision tower's config (patches, merge size, time steps)."""
        from transformers import Qwen2_5_VLVisionConfig

        config = self.model.config.vision_config
        assert isinstance(config, Qwen2_5_VLVisionConfig), "Qwen2_5_VLConfig builds its vision_config"
        return config


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("SNARK_DEVICE=cuda but no CUDA device is visible: use SNARK_DEVICE=auto or cpu.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_attention(device: torch.device) -> str:
    """flash_attention_2 when flash-attn imports on CUDA (`snark[flash]`), else PyTorch's sdpa."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def warn_if_large_on_cpu(model_id: str, folder: Path) -> None:
    """Say before a long load that a real checkpoint in float32 on CPU needs a lot of memory and is slow."""
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    stored_dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    in_float32 = stored * (2 if stored_dtype in ("bfloat16", "float16") else 1)
    if in_float32 < LARGE_ON_CPU_BYTES:
        return
    log.warning(
        "%s will take about %.0f GB of memory in float32 on CPU, and each answer minutes: it is meant for a GPU "
        "(SNARK_DEVICE=cuda). On CPU, try VLM_SIZE=3B, or `snark serve --tiny` to try every endpoint.",
        model_id,
        in_float32 / 1e9,
    )


def load_model(model_id: str, *, device: str = "auto", hub: Hub | None = None) -> LoadedModel:
    """Load ``model_id`` (hub id or local folder). Raises ``ConfigError`` saying what to do when the
    weights are not there (offline, typo, no access)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    target = pick_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    attn = pick_attention(target)
    local = Path(model_id).expanduser()
    if (model_id.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(
            f"VLM_MODEL={model_id!r} is not a checkpoint folder (no config.json there). Point VLM_MODEL at a "
            "folder written by save_pretrained, or run `snark serve --tiny` to try Snark offline."
        )
    source = local if local.exists() else resolve_checkpoint(model_id, hub)
    build = random_weights_build(source)
    tiny = build is not None
    if target.type == "cpu" and not tiny:
        warn_if_large_on_cpu(model_id, source)
    log.info("loading %s on %s (%s, attention=%s)", source, target, dtype, attn)
    started = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(str(source))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(source),
            dtype=dtype,
            attn_implementation=attn,
            device_map="auto" if target.type == "cuda" else None,  # shards across several GPUs
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Could not load Qwen2.5-VL weights for {model_id!r}: {exc}\n"
            "Set VLM_MODEL to a local checkpoint folder or a hub id you can download (check the network "
            "and HF_TOKEN), or run `snark serve --tiny` to try every endpoint offline with a tiny "
            "random-weight model."
        ) from exc
    if target.type == "cpu":
        model.to(target)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types it as unbound
    model.eval()
    processor.tokenizer.padding_side = "left"
    load_s = time.perf_counter() - started
    log.info("loaded %s in %.1f s%s", source, load_s, " (random-weight test model)" if tiny else "")
    return LoadedModel(
        model=model,
        processor=processor,
        name=random_model_name(build[0]) if build is not None else model_id,
        device=next(model.parameters()).device,
        dtype=dtype,
        attn_implementation=attn,
        is_tiny=tiny,
        load_s=load_s,
    )
