"""SNARK_COMPILE=1: the decode step compiled with ``torch.compile`` and CUDA graphs, on CUDA.

A compiled step with CUDA graphs (``mode="reduce-overhead"``, ``dynamic=False``) replays one
recorded graph per input shape, with its inputs at fixed addresses. The continuous-batching loop
changes the running rows at every step, so the compiled step sees fixed shapes instead:

* **row buckets**: the running rows are padded to a power of two (``row_capacity``); padding slots
  feed a pad token and attend only to the column they write, and nobody reads what they produce;
* **cache length buckets**: in compiled mode the ``RowCache`` allocates ``max_batch_size`` rows and a
  power-of-two number of columns (at least ``COMPILED_COLUMN_FLOOR``), marks its tensors as static
  addresses, and each step attends over every allocated column with a mask. The column each row
  writes is a device tensor, so the graph does not change with it. A longer context grows the
  columns to the next power of two: one more graph per length, never twice the same;
* **warm-up**: every row bucket runs a few steps at start-up, so compiling happens before
  ``/health`` says ready.

The prefill, whose shapes change with every prompt, stays eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from snark.engine.request import GenerationRequest, PromptInputs, SamplingParams
from snark.engine.transformers.cache import row_capacity
from snark.errors import ConfigError

log = logging.getLogger(__name__)

COMPILED_COLUMN_FLOOR = 2048  # a prompt with a default-size image (<= 1280 tokens) plus 256 new tokens
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


def row_buckets(max_rows: int) -> list[int]:
    """The row counts a compiled engine runs: powers of two up to ``max_rows`` (and it)."""
    return sorted({row_capacity(n, max_rows) for n in range(1, max_rows + 1)})


def column_bucket(needed: int, *, floor: int = COMPILED_COLUMN_FLOOR) -> int:
    """Cache columns for ``needed`` tokens: the next power of two, at least ``floor``."""
    columns = floor
    while columns < needed:
        columns *= 2
    return columns


def compile_options(device: torch.device) -> dict:
    """``fullgraph=False``: flash-attn kernels break the graph, and a break should cost speed, not a
    crash. On CPU (tests only) inductor's C++ backend compiles the same step, without CUDA graphs."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return {"dynamic": False, "fullgraph": False, "mode": mode}


def allow_recompiles(max_rows: int) -> None:
    """Let dynamo keep one graph per (row bucket, column bucket) instead of its default 8 per
    function, after which it would silently run the step eagerly."""
    graphs = len(row_buckets(max_rows)) * 8  # 8 column buckets: 2048 .. 262144 tokens
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)


def compile_step(model, device: torch.device) -> Callable:
    """The model's forward, compiled for decode steps."""
    return torch.compile(model, **compile_options(device))


def warm_up(run_requests: Callable[[list[GenerationRequest]], None], prompt: PromptInputs, *, max_rows: int) -> None:
    """Run a few steps at every row bucket through the engine's own loop, so every graph (and every
    CUDA graph recording) exists before the first request."""
    params = SamplingParams(max_new_tokens=WARM_UP_NEW_TOKENS, ignore_eos=True)
    for rows in row_buckets(max_rows):
        started = time.perf_counter()
        run_requests([GenerationRequest(prompt=prompt, params=params) for _ in range(rows)])
        log.info("compiled the decode step for %d rows in %.1f s", rows, time.perf_counter() - started)
