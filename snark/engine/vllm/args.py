"""Snark's settings -> vLLM's engine arguments, with one rule for each setting the two share.

Pure functions over ``Settings``: nothing here imports vLLM, so the mapping is tested in any
environment. The combinations with no single meaning are refused by ``Settings`` itself
(``snark.config``, which also names the engine arguments derived here), before minutes of loading.

    VLLM_TP_SIZE / VLLM_PP_SIZE        tensor_parallel_size / pipeline_parallel_size
    VLLM_DISTRIBUTED_BACKEND           distributed_executor_backend ("mp" | "ray")
    VLLM_GPU_MEM_UTILIZATION           gpu_memory_utilization
    VLLM_ENFORCE_EAGER                 enforce_eager
    VLLM_ENGINE_ARGS (JSON)            any other AsyncEngineArgs field, passed as given

Overlaps, one rule each:

    rows decoded together   max_num_seqs = VLLM_MAX_NUM_SEQS, else SNARK_MAX_BATCH_SIZE; both given
                            and different is refused.
    context                 max_model_len = VLLM_MAX_MODEL_LEN, else SNARK_MAX_PROMPT_TOKENS +
                            SNARK_MAX_NEW_TOKENS_LIMIT cut to the checkpoint's own context (what
                            Snark can ever send, so the KV cache is not sized for more). Prompts
                            longer than SNARK_MAX_PROMPT_TOKENS or max_model_len - 1 are a 400.
    KV budget               SNARK_KV_CACHE_GIB = kv_cache_memory_bytes (per GPU); refused together
                            with VLLM_GPU_MEM_UTILIZATION, which vLLM would then ignore.
    compilation             vLLM compiles and captures CUDA graphs unless VLLM_ENFORCE_EAGER=1.
    log-probabilities       logprobs_mode = "processed_logprobs": the distribution each token was drawn
                            from, as Snark's own engine reports (VLLM_ENGINE_ARGS may override it).
    images                  Snark resizes images under SNARK_MIN/MAX_IMAGE_PIXELS (and a request's own cap)
                            itself; vLLM's image resizer gets SNARK_MAX_IMAGE_PIXELS as its cap, and
                            SNARK_MAX_IMAGES_PER_REQUEST = limit_mm_per_prompt["image"].
    videos                  Snark samples and resizes videos itself (SNARK_VIDEO_FPS, SNARK_*VIDEO_FRAME*);
                            vLLM's video processor samples no frames (do_sample_frames=False), applies no
                            clip-wide pixel cap of its own, and each request's bounds hold its frames
                            (``prompt.video_size_bounds``). SNARK_MAX_VIDEO_FRAME_PIXELS bounds its profiling;
                            SNARK_MAX_VIDEOS_PER_REQUEST = limit_mm_per_prompt["video"].
"""

from __future__ import annotations

from typing import Any

from snark.config import Settings

# One merged patch (14 x 14 patches, merged 2 x 2): the smallest image Qwen2-VL's resizer ever outputs.
SMALLEST_IMAGE_PIXELS = 28 * 28

# Settings of Snark's own engine that vLLM has no use for: start-up warns when they are given.
TRANSFORMERS_ONLY = {
    "device": "SNARK_DEVICE",
    "batch_wait_ms": "SNARK_BATCH_WAIT_MS",
    "max_prefill_tokens": "SNARK_MAX_PREFILL_TOKENS",
    "kv_block_size": "SNARK_KV_BLOCK_SIZE",
    "encoder_cache_mib": "SNARK_ENCODER_CACHE_MIB",
}


def given_transformers_only(settings: Settings) -> list[str]:
    """Env names of the given settings that only Snark's own engine reads."""
    return [env for name, env in TRANSFORMERS_ONLY.items() if name in settings.model_fields_set]


def max_model_len(settings: Settings, model_context_len: int | None) -> int:
    """vLLM's context window: VLLM_MAX_MODEL_LEN, else what Snark can send, cut to the model's own."""
    if settings.vllm_max_model_len is not None:
        return settings.vllm_max_model_len
    wanted = settings.max_prompt_tokens + settings.max_new_tokens_limit
    return min(wanted, model_context_len) if model_context_len else wanted


def max_num_seqs(settings: Settings) -> int:
    return settings.vllm_max_num_seqs if settings.vllm_max_num_seqs is not None else settings.max_batch_size


def prompt_token_limit(settings: Settings, context_len: int) -> int:
    """The longest prompt Snark passes to vLLM: at least one token must fit after it."""
    return min(settings.max_prompt_tokens, context_len - 1)


def mm_processor_kwargs(settings: Settings) -> dict[str, Any]:
    """vLLM's processor options, per modality: a flat ``size`` would reach both processors."""
    return {
        # Snark hands vLLM images already resized under each request's bounds (SNARK_MIN/MAX_IMAGE_PIXELS, a
        # request's own cap). Between one merged patch and the server's cap, vLLM's resizer keeps every such
        # size, and with it the token count; the cap also sizes vLLM's encoder-cache profiling.
        "images_kwargs": {"size": {"shortest_edge": SMALLEST_IMAGE_PIXELS, "longest_edge": settings.max_image_pixels}},
        # Snark's videos arrive sampled (every frame a sampled one) and resized (sides multiples of 28). These
        # bounds size vLLM's profiling; each request brings bounds that hold its own frames as they are.
        "videos_kwargs": {
            "size": {"shortest_edge": SMALLEST_IMAGE_PIXELS, "longest_edge": settings.max_video_frame_pixels},
            "do_sample_frames": False,
            "cap_pixels_per_frame": False,  # Snark's clip-wide budget (SNARK_MAX_VIDEO_TOKENS) applied already
        },
    }


def engine_args(settings: Settings, *, model_context_len: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.AsyncEngineArgs``. Optional settings that were not given are
    left out, so vLLM's own defaults apply to them."""
    s = settings
    args: dict[str, Any] = {
        "model": s.model_id,
        "max_model_len": max_model_len(s, model_context_len),
        "max_num_seqs": max_num_seqs(s),
        "limit_mm_per_prompt": {"image": s.max_images_per_request, "video": s.max_videos_per_request},
        "mm_processor_kwargs": mm_processor_kwargs(s),
        # Log-probabilities from the distribution each token was drawn from (after penalties, the grammar
        # mask, temperature, top-k and top-p), as Snark's own engine reports them; vLLM's default is the
        # raw model's. VLLM_ENGINE_ARGS may choose "raw_logprobs" back.
        "logprobs_mode": "processed_logprobs",
    }
    optional = {
        "tensor_parallel_size": s.vllm_tp_size,
        "pipeline_parallel_size": s.vllm_pp_size,
        "distributed_executor_backend": s.vllm_distributed_backend,
        "gpu_memory_utilization": s.vllm_gpu_mem_utilization,
        "kv_cache_memory_bytes": s.kv_cache_bytes,
        "enforce_eager": s.vllm_enforce_eager,
        # vLLM's own prefix caching (on by default, image-aware) follows SNARK_PREFIX_CACHING when given.
        "enable_prefix_caching": s.prefix_caching if "prefix_caching" in s.model_fields_set else None,
    }
    args.update({key: value for key, value in optional.items() if value is not None})
    args.update(s.vllm_extra_engine_args)
    return args
