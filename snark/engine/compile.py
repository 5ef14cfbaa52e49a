"""SNARK_COMPILE=1: a static KV cache and a ``torch.compile``d decode step, on CUDA.

transformers compiles the decode step by itself when ``generate`` runs with a compilable cache on
CUDA (``GenerationMixin._valid_auto_compile_criteria``: a CUDA model and a ``StaticCache``; then
``_sample`` calls ``get_compiled_call(generation_config.compile_config)`` for every decode step,
while the prefill, whose shapes change with every prompt, stays eager). Compiled with
``dynamic=False`` and CUDA graphs (``mode="reduce-overhead"``), every distinct shape is its own
graph, so Snark keeps the shapes few and builds them before the first request:

* rows are padded to a power-of-two batch bucket (``batching.bucket_size``) with finished rows;
* each bucket keeps one ``StaticCache`` across batches (``DecodeCaches``), reset in place: the CUDA
  graphs recorded over its tensors replay as they are. A new cache per ``generate`` (what
  ``cache_implementation="static"`` does) would move the cache tensors, which are static graph
  inputs, and make CUDA graphs re-record at every batch;
* cache lengths are powers of two from ``CACHE_FLOOR_TOKENS``: a longer request grows its bucket's
  cache (one recompile), and no length is ever compiled twice;
* ``warm_up`` runs every bucket at start-up, so compiling happens before ``/health`` says ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from transformers import CompileConfig, StaticCache

from snark.engine.batching import bucket_size
from snark.engine.request import GenerationRequest, PromptInputs, RequestState, SamplingParams
from snark.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FLOOR_TOKENS = 2048  # a prompt with a default-size image (<= 1280 tokens) plus 256 new tokens
WARM_UP_NEW_TOKENS = 4  # prefill, then 3 decode steps: CUDA graph trees warm up, record, replay


def require_cuda(device: torch.device | None = None) -> None:
    """Refuse SNARK_COMPILE=1 where it cannot pay: anywhere but a CUDA device."""
    cuda_visible = torch.cuda.is_available()
    if (device is None and cuda_visible) or (device is not None and device.type == "cuda"):
        return
    where = "no CUDA device is visible" if not cuda_visible else f"the model was loaded on {device}"
    raise ConfigError(
        f"SNARK_COMPILE=1 compiles the decode step for CUDA GPUs, but {where}. "
        "Unset SNARK_COMPILE (or set SNARK_DEVICE=cuda on a GPU machine)."
    )


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch shapes a compiled engine runs: powers of two up to ``max_batch_size`` (and it)."""
    return sorted({bucket_size(n, max_batch_size) for n in range(1, max_batch_size + 1)})


def cache_length_bucket(needed_tokens: int, *, ceiling: int, floor: int = CACHE_FLOOR_TOKENS) -> int:
    """A static cache length for ``needed_tokens`` (prompt width + new tokens): the next power of two,
    at least ``floor``, but never past ``ceiling`` (the longest a request may be), nor below need."""
    length = floor
    while length < needed_tokens:
        length *= 2
    return max(needed_tokens, min(length, ceiling))


def compile_config(device: torch.device) -> CompileConfig:
    """How transformers compiles the decode step. ``fullgraph=False``: flash-attn kernels break the
    graph (transformers turns fullgraph off for them anyway), and a break should cost speed, not a
    crash; the Qwen2.5-VL decode step traced as a single graph in our CPU check."""
    if device.type == "cuda":
        return CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    # Only reachable through Engine(allow_cpu_compile=True): tests run this path with inductor's
    # C++ backend, which has no CUDA graphs.
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' own switch to compile off CUDA
    return config


def allow_recompiles(max_batch_size: int) -> None:
    """Let dynamo keep one graph per (batch bucket, cache length) instead of its default 8 per
    function, after which it would silently run the decode step eagerly."""
    graphs = len(batch_buckets(max_batch_size)) * 8  # 8 cache lengths: 2048 .. 262144 tokens
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, graphs)


def warm_up(run_batch: Callable[[list[GenerationRequest]], None], prompt: PromptInputs, *, max_batch_size: int) -> None:
    """Run a short batch of every bucket through the engine's own ``generate`` path, so every graph
    (and every CUDA graph recording) exists before the first request."""
    params = SamplingParams(max_new_tokens=WARM_UP_NEW_TOKENS, ignore_eos=True)
    for size in batch_buckets(max_batch_size):
        started = time.perf_counter()
        run_batch([GenerationRequest(prompt=prompt, params=params) for _ in range(size)])
        log.info("compiled the decode step for batches of %d in %.1f s", size, time.perf_counter() - started)


def ensure_compiled(model) -> None:
    """After ``warm_up``: transformers sets ``_compiled_call`` in ``get_compiled_call``, which ``generate``
    only calls when ``_valid_auto_compile_criteria`` holds. Say so instead of serving eagerly."""
    if not hasattr(model, "_compiled_call"):
        raise ConfigError(
            "SNARK_COMPILE=1, but transformers declined to compile the decode step (weights offloaded to "
            "CPU or disk, or a quantization that cannot compile): unset SNARK_COMPILE."
        )


def padding_row(template: GenerationRequest) -> GenerationRequest:
    """A finished one-token row that fills a batch up to its bucket; the tracker never streams it."""
    # Greedy one-token params: a padding row must not send the batch through the per-row sampler.
    row = GenerationRequest(prompt=PromptInputs(input_ids=template.prompt.input_ids[-1:]), params=SamplingParams(max_new_tokens=1))
    row.state = RequestState.FINISHED
    return row


class DecodeCaches:
    """One static KV cache per batch bucket, reused (reset in place) by every batch of that size.

    Memory: a bucket of ``b`` rows holds ``b * length`` tokens of KV cache (57 KB a token on the
    7B in bf16). At the floor length all buckets up to 16 rows hold 31 * 2048 tokens, 3.6 GB on the
    7B. When a request needs a longer cache than the floor, the other buckets' caches are dropped
    first (they are re-created at their next use), so long contexts do not pile up.
    """

    def __init__(self, model_config, *, floor: int = CACHE_FLOOR_TOKENS) -> None:
        self.model_config = model_config
        self.floor = floor
        self._caches: dict[int, tuple[int, StaticCache]] = {}  # batch bucket -> (length, cache)

    def get(self, batch_size: int, needed_tokens: int, *, ceiling: int) -> StaticCache:
        held = self._caches.get(batch_size)
        if held is not None and held[0] >= needed_tokens:
            held[1].reset()  # zeroes keys, values and lengths in place: the tensors keep their addresses
            return held[1]
        length = cache_length_bucket(needed_tokens, ceiling=ceiling, floor=self.floor)
        if length > self.floor:
            self._caches.clear()
        else:
            self._caches.pop(batch_size, None)
        cache = StaticCache(config=self.model_config, max_cache_len=length)
        self._caches[batch_size] = (length, cache)
        return cache

    @property
    def held(self) -> dict[int, int]:
        """Batch bucket -> cache length, for logs and tests."""
        return {size: length for size, (length, _) in self._caches.items()}
