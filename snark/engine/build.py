"""The engine a server's settings choose: Snark's own (transformers) or vLLM. Used by the app and by
the benchmark's in-process runs alike."""

from __future__ import annotations

from snark.config import Settings
from snark.engine.base import Engine
from snark.engine.loader import load_model
from snark.engine.transformers import TransformersEngine


def build_engine(settings: Settings) -> Engine:
    """The engine ``settings`` choose (SNARK_ENGINE, or auto: vLLM when a VLLM_* setting is given).
    Raises ``ConfigError`` naming the install command when vLLM is chosen but not installed."""
    if settings.engine_name == "vllm":
        from snark.engine.vllm.engine import VllmEngine
        from snark.engine.vllm.runtime import require_vllm

        require_vllm()
        return VllmEngine(settings)
    return TransformersEngine(
        lambda: load_model(settings.model_id, device=settings.device),
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        max_waiting_requests=settings.max_waiting_requests,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_block_size=settings.kv_block_size,
        prefix_caching=settings.prefix_caching,
        encoder_cache_bytes=settings.encoder_cache_bytes,
        cuda_graphs=settings.cuda_graphs,
        max_image_pixels=settings.max_image_pixels,
    )
