"""Which model the benchmark runs (``--tiny``, ``--random-weights``, ``--model``, the server's own),
and the roofline of an architecture without loading it."""

from __future__ import annotations

import argparse

import torch

from bench.ratios import roofline_tok_s
from snark.engine.loader import LoadedModel
from snark.errors import ConfigError


def load(args: argparse.Namespace, settings) -> LoadedModel:
    """The model to benchmark: ``--random-weights``, ``--tiny``, ``--model``, else the server's own."""
    from snark.engine.loader import load_model
    from snark.engine.tiny_model import ensure_tiny_model

    device = args.device or settings.device
    if args.random_weights:
        from snark.engine.random_model import build_random_model

        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            raise ConfigError(
                f"--random-weights {args.random_weights} builds a real-size model for a CUDA GPU (the 7B is 33 GB "
                "in fp32 on a CPU); on this machine, --roofline-only prints its roofline."
            )
        return build_random_model(
            args.random_weights, processor_dir=ensure_tiny_model(settings.tiny_dir), device=device
        )
    if args.tiny:
        return load_model(str(ensure_tiny_model(settings.tiny_dir)), device=device)
    return load_model(args.model or settings.model_id, device=device)


def print_roofline_only(args: argparse.Namespace, settings) -> int:
    """``--roofline-only``: the architecture on the meta device (no memory, no weights), its bytes."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from snark.engine.random_model import decode_weight_bytes, meta_model

    if args.random_weights:
        model, name = meta_model(args.random_weights), f"Qwen2.5-VL-{args.random_weights.upper()} architecture"
    else:
        name = args.model or settings.model_id
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as exc:
            raise ConfigError(f"--roofline-only: cannot read the config of {name!r}: {exc}") from exc
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    weights = decode_weight_bytes(model)
    print(f"{name}: {weights / 1e9:.2f} GB of bf16 weights read per decode step (vision tower excluded)")
    print(
        f"roofline at {args.bandwidth_gbs:.0f} GB/s: {roofline_tok_s(weights, args.bandwidth_gbs):.0f} tok/s per stream"
    )
    return 0
