"""Everything that touches the ``vllm`` package: imported only when the vLLM engine starts.

Only the async engine's stable surface is used, the same in vLLM 0.32 (the CPU build tested here)
and 0.33 (CUDA): ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``, ``generate(TokensPrompt,
SamplingParams(output_kind=DELTA), request_id)``, ``errored`` and ``shutdown()``; aborting is
``generate``'s own reaction to being cancelled. One internal is read where it exists: the size of
vLLM's encoder cache (``input_processor.mm_encoder_cache_size``), the most tokens one image or video
may have, so that Snark refuses larger ones with its own advice.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from snark.config import Settings, env_name
from snark.engine.base import ModelFacts
from snark.engine.loader import TINY_MODEL_NAME
from snark.engine.tiny_model import tiny_checkpoint_version
from snark.engine.vllm import args as vllm_args
from snark.engine.vllm.prompt import VllmPrompt
from snark.errors import ConfigError
from snark.values import SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "SNARK_ENGINE=vllm (or a VLLM_* setting) needs vLLM in Snark's environment: on a CUDA machine run "
    "`uv sync --extra vllm --no-group pinned`, then `uv run --extra vllm --no-group pinned snark serve`."
)
# Snark's settings that share vLLM's prefix. vLLM warns about VLLM_* variables it does not know;
# these are Snark's own, so they are registered with it as known ones.
SNARK_VLLM_VARIABLES = tuple(env_name(name) for name in Settings.model_fields if name.startswith("vllm_"))


def require_vllm() -> None:
    """Raise ``ConfigError`` naming the install command when vLLM cannot be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(INSTALL_HINT)


@dataclass
class Runtime:
    """A started ``AsyncLLM`` and what Snark needs beside it (the HF processor for prompts)."""

    llm: Any  # vllm.v1.engine.async_llm.AsyncLLM
    processor: Any
    facts: ModelFacts
    max_model_len: int
    max_item_tokens: int | None  # one image's or video's tokens, at most (vLLM's encoder cache); None: not known
    default_sampling: SamplingParams
    _sampling_params: Any
    _structured_outputs: Any
    _tokens_prompt: Any
    _dead_errors: tuple[type[BaseException], ...]
    _client_errors: tuple[type[BaseException], ...]

    def sampling_params(self, fields: dict[str, Any]):
        structured = fields.get("structured_outputs")
        if structured is not None:
            fields = {**fields, "structured_outputs": self._structured_outputs(**structured)}
        return self._sampling_params(**fields)

    def tokens_prompt(self, prompt: VllmPrompt):
        tokens = self._tokens_prompt(prompt_token_ids=prompt.engine_ids)
        tokens.update(prompt.multi_modal_fields())
        if prompt.cache_salt is not None:
            tokens["cache_salt"] = prompt.cache_salt  # vLLM's own prefix caching keeps salts apart too
        return tokens

    def is_engine_dead(self, exc: BaseException) -> bool:
        return isinstance(exc, self._dead_errors) or isinstance(exc.__cause__, self._dead_errors)

    def is_validation_error(self, exc: BaseException) -> bool:
        return isinstance(exc, self._client_errors)


def load_runtime(settings: Settings) -> Runtime:
    """Build vLLM's engine for ``settings`` (minutes), in the engine's thread: no event loop runs there,
    so ``AsyncLLM`` starts its output handler on the loop of the first request (the server's)."""
    try:
        import vllm
        from vllm import envs
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    for name in SNARK_VLLM_VARIABLES:
        envs.environment_variables.setdefault(name, partial(os.getenv, name))

    model_id = settings.model_id
    try:
        config = AutoConfig.from_pretrained(model_id)
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Could not load the Qwen2.5-VL config and processor for {model_id!r}: {exc}\n"
            "Set VLM_MODEL to a local checkpoint folder or a hub id you can download (check the network and HF_TOKEN)."
        ) from exc
    text_config = config.get_text_config()
    engine_kwargs = vllm_args.engine_args(
        settings, model_context_len=getattr(text_config, "max_position_embeddings", None)
    )
    for env in vllm_args.given_transformers_only(settings):
        log.warning("%s is a setting of Snark's own engine; the vLLM engine does not use it", env)
    log.info("starting vLLM %s with %s", vllm.__version__, engine_kwargs)
    try:
        engine_args = vllm.AsyncEngineArgs(**engine_kwargs)
    except TypeError as exc:  # an unknown field in VLLM_ENGINE_ARGS
        raise ConfigError(f"VLLM_ENGINE_ARGS names an argument vLLM {vllm.__version__} does not have: {exc}") from exc
    llm = AsyncLLM.from_engine_args(engine_args)

    try:
        generation = GenerationConfig.from_pretrained(model_id)
    except OSError:  # no generation_config.json: the model's config decides, as in transformers
        generation = GenerationConfig.from_model_config(config)
    local = Path(model_id).expanduser()
    tiny = local.exists() and tiny_checkpoint_version(local) is not None
    model_config = llm.model_config
    parallel = llm.vllm_config.parallel_config
    max_item_tokens = _encoder_cache_tokens(llm)
    if max_item_tokens is not None:
        _log_item_cap(
            settings, max_item_tokens, vllm_args.prompt_token_limit(settings, int(model_config.max_model_len))
        )
    facts = ModelFacts(
        name=TINY_MODEL_NAME if tiny else model_id,
        engine="vllm",
        device=f"{_device_type()} (vLLM {vllm.__version__}, tensor parallel {parallel.tensor_parallel_size}, "
        f"pipeline parallel {parallel.pipeline_parallel_size})",
        dtype=str(model_config.dtype).removeprefix("torch."),
        attention="vllm",
        is_tiny=tiny,
    )
    return Runtime(
        llm=llm,
        processor=processor,
        facts=facts,
        max_model_len=int(model_config.max_model_len),
        max_item_tokens=max_item_tokens,
        default_sampling=SamplingParams.model_defaults(generation),
        _sampling_params=partial(vllm.SamplingParams, output_kind=RequestOutputKind.DELTA),
        _structured_outputs=StructuredOutputsParams,
        _tokens_prompt=vllm.TokensPrompt,
        _dead_errors=(EngineDeadError,),
        _client_errors=_client_errors(),
    )


def _log_item_cap(settings: Settings, max_item_tokens: int, prompt_limit: int) -> None:
    """Say how large one video may be on vLLM, and warn where that refuses videos Snark would sample."""
    log.info("vLLM takes up to %d tokens of one image or video (its encoder cache)", max_item_tokens)
    largest = min(settings.max_video_tokens, prompt_limit)
    if largest > max_item_tokens:
        log.warning(
            "Videos of up to %d tokens fit SNARK_MAX_VIDEO_TOKENS and SNARK_MAX_PROMPT_TOKENS, but vLLM takes at "
            "most %d tokens of one video (its encoder cache, sized by max_num_batched_tokens): larger ones are "
            "refused. Set VLLM_ENGINE_ARGS='{\"max_num_batched_tokens\": %d}' to take them, or lower "
            "SNARK_MAX_VIDEO_TOKENS.",
            largest,
            max_item_tokens,
            largest,
        )


def _encoder_cache_tokens(llm) -> int | None:
    """The most tokens one image or video may have: vLLM keeps an item's vision features whole in its
    encoder cache (its size: max_num_batched_tokens, or its own estimate of the largest item if more)."""
    size = getattr(getattr(llm, "input_processor", None), "mm_encoder_cache_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _client_errors() -> tuple[type[BaseException], ...]:
    """vLLM's exceptions for a request it refuses (a 400 for the client)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # vLLM releases before the split into client and server errors raised ValueError
        return (ValueError,)
    return (VLLMClientError, ValueError)


def _device_type() -> str:
    from vllm.platforms import current_platform

    return str(current_platform.device_type)
