"""CUDA graphs for decode steps.

A decode step runs one token per row through every layer: a few hundred small kernels whose launch
costs more than their work on a GPU (at 7B, a 16-row step launches for longer than it computes).
Its shapes depend only on how many rows it has, so the forward pass is captured once per batch size
at start-up and replayed:

    rows' tokens, positions, slots, lengths, block tables
        ──► copied into fixed buffers [size]  (size: the smallest captured size >= rows)
        ──► graph replay: embed -> layers (flash-attn's paged decode kernel) -> logits [size, vocab]
        ──► the real rows' logits [rows, vocab] -> the sampler, outside the graph

Padding rows (a step of 5 rows replays the 8-row graph) read and write only the null block, which no
real row reads. Captured sizes are 1, 2, 4, 8 and then every multiple of 8 up to the engine's row
limit, as vLLM does. Prefill steps and steps that mix prefill with decoding run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import torch

from snark.engine.transformers.blocks import NULL_BLOCK, padded_table
from snark.engine.transformers.kv_cache import KVCache
from snark.engine.transformers.model import AttentionPlan, FlatLanguageModel, PagedDecode

log = logging.getLogger(__name__)

Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def graph_sizes(max_rows: int) -> list[int]:
    """The batch sizes captured for a row limit: 1, 2, 4, 8, 16, 24, ... up to ``max_rows``."""
    sizes = [s for s in (1, 2, 4) if s < max_rows] + list(range(8, max_rows, 8))
    return sorted({*sizes, max_rows})


def cuda_capture(pool) -> Capture:
    """Capture with ``torch.cuda.CUDAGraph``, every graph in one memory ``pool`` (they never run at
    once). The function runs once eagerly first, on a side stream, so lazy set-up (kernel choice,
    workspace allocation) happens outside the capture."""

    def capture(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``cache``, for up to ``max_rows`` rows of at most
    ``max_blocks`` KV blocks each."""

    def __init__(
        self, model: FlatLanguageModel, cache: KVCache, *, max_rows: int, max_blocks: int, capture: Capture
    ) -> None:
        self.model, self.cache = model, cache
        self.sizes = graph_sizes(max_rows)
        rows, device = self.sizes[-1], cache.keys[0].device
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)  # [rows]
        self.positions = torch.zeros(3, rows, dtype=torch.long, device=device)  # [3, rows] M-RoPE
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)  # [rows] where the new K/V go
        self.lengths = torch.ones(rows, dtype=torch.int32, device=device)  # [rows] tokens seen, the new one included
        self.tables = torch.full((rows, max_blocks), NULL_BLOCK, dtype=torch.int32, device=device)  # [rows, blocks]
        self._capture = capture
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.replayed = 0  # steps run by replaying a graph (tests and logs)

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    @property
    def max_blocks(self) -> int:
        return self.tables.shape[1]

    def capture_all(self) -> None:
        """Capture every size, the largest first (the smaller ones reuse its memory)."""
        started = time.perf_counter()
        self._pad_from(0)
        for size in reversed(self.sizes):
            self._replays[size] = self._capture(partial(self._forward, size))
        log.info("captured decode steps for %s rows in %.1f s", self.sizes, time.perf_counter() - started)

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        lengths: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step of ``len(ids)`` rows -> their ``[rows, vocab]`` float32 logits."""
        rows = ids.shape[0]
        size = next(s for s in self.sizes if s >= rows)
        self.input_ids[:rows].copy_(ids)
        self.positions[:, :rows].copy_(positions)
        self.slots[:rows].copy_(slots)
        self.lengths[:rows].copy_(torch.tensor(lengths, dtype=torch.int32))
        padded = [padded_table(table, self.max_blocks) for table in tables]
        self.tables[:rows].copy_(torch.tensor(padded, dtype=torch.int32))
        self._pad_from(rows)
        self.replayed += 1
        return self._replays[size]()[:rows]

    def _pad_from(self, rows: int) -> None:
        """Rows ``[rows, max_rows)`` become padding: one token in the null block's first slot."""
        self.input_ids[rows:] = 0
        self.positions[:, rows:] = 0
        self.slots[rows:] = NULL_BLOCK * self.cache.block_size
        self.lengths[rows:] = 1
        self.tables[rows:] = NULL_BLOCK

    def _forward(self, size: int) -> torch.Tensor:
        """The captured work for ``size`` rows, reading only the fixed buffers."""
        plan = AttentionPlan(
            slots=self.slots[:size], paged_decode=PagedDecode(tables=self.tables[:size], lengths=self.lengths[:size])
        )
        embeds = self.model.embed_tokens(self.input_ids[:size])  # [size, hidden]
        hidden = self.model.forward(embeds, self.positions[:, :size], plan, self.cache)
        return self.model.logits(hidden)  # [size, vocab]
