"""The CUDA attention path (flash-attn's paged kernels) on CPU: no GPU here, so reference
implementations of ``flash_attn_varlen_func``'s and ``flash_attn_with_kvcache``'s documented semantics
stand in for the kernels (causal masks aligned bottom-right, keys read through the block table), and
the arguments Snark builds for them must give the same greedy output as the SDPA path: batched,
chunked and from the prefix cache. CUDA graphs cannot be captured without a GPU either: their test
"captures" by running the step eagerly on the same fixed buffers, which checks everything around the
capture (buffers, padding rows, batch sizes, the decode kernel's arguments)."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from snark.engine.transformers.graphs import graph_sizes
from snark.values import ChatTurn, SamplingParams
from tests.conftest import start_engine

CALLS: list[int] = []  # rows of each varlen call
DECODE_CALLS: list[int] = []  # rows of each paged decode call


def reference_varlen(
    q, k_cache, v_cache, *, causal, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
):
    assert q.dtype == k_cache.dtype and block_table.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert causal and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    CALLS.append(block_table.shape[0])
    out = torch.empty_like(q)
    for i in range(block_table.shape[0]):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        length = int(cu_seqlens_k[i + 1] - cu_seqlens_k[i])
        assert length <= max_seqlen_k
        keys = k_cache[block_table[i].long()].flatten(0, 1)[:length].transpose(0, 1)[None]  # [1, kv, len, d]
        values = v_cache[block_table[i].long()].flatten(0, 1)[:length].transpose(0, 1)[None]
        n = q1 - q0
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]  # bottom-right
        queries = q[q0:q1].transpose(0, 1)[None]
        out[q0:q1] = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)[
            0
        ].transpose(0, 1)
    return out


def reference_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, causal):
    """One new token per row: ``q`` [rows, 1, heads, head_dim] attends to its row's first
    ``cache_seqlens[i]`` cached tokens (its own among them)."""
    assert causal and q.shape[1] == 1 and cache_seqlens.dtype == torch.int32 and block_table.dtype == torch.int32
    DECODE_CALLS.append(block_table.shape[0])
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        length = int(cache_seqlens[i])
        keys = k_cache[block_table[i].long()].flatten(0, 1)[:length].transpose(0, 1)[None]  # [1, kv, len, d]
        values = v_cache[block_table[i].long()].flatten(0, 1)[:length].transpose(0, 1)[None]
        queries = q[i].transpose(0, 1)[None]  # [1, heads, 1, d]
        out[i] = F.scaled_dot_product_attention(queries, keys, values, enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.fixture
def flash_engine(tiny_model_dir, monkeypatch):
    kernels = types.SimpleNamespace(
        flash_attn_varlen_func=reference_varlen, flash_attn_with_kvcache=reference_with_kvcache
    )
    monkeypatch.setitem(sys.modules, "flash_attn", kernels)
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=24)
    engine.runner.flash = True
    yield engine
    engine.stop()


def answers_together(engine, texts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Greedy answers to ``texts``, submitted at once so they share steps."""
    prompts = [engine.prompts.build([ChatTurn("user", [text])], min_pixels=3136, max_pixels=200_000) for text in texts]
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)

    async def together():
        return [r.text for r in await asyncio.gather(*[engine.run_to_completion(p, params) for p in prompts])]

    return asyncio.run(together())


def test_the_flash_arguments_give_the_sdpa_path_s_output(flash_engine, tiny_engine):
    texts = ("Tell me a story about bicycles. " * 4, "Hi.", "Why is the sky blue? " * 3)
    expected = answers_together(tiny_engine, texts, 8)
    assert answers_together(flash_engine, texts, 8) == expected  # chunked prompts beside decoding rows
    assert answers_together(flash_engine, texts, 8) == expected  # again, from the prefix cache
    assert flash_engine.prefix_cache_counts[1] > 0
    assert max(CALLS) == 3  # the kernel ran, over every row of a step at once


def test_captured_decode_steps_give_the_sdpa_path_s_output(flash_engine, tiny_engine):
    texts = ("Name three rivers. " * 3, "Hello there.", "Count to ten, slowly. " * 2)
    expected = answers_together(tiny_engine, texts, 10)
    flash_engine.capture_decode_graphs(lambda forward: forward)  # no GPU: "replay" runs the step eagerly
    graphs = flash_engine.runner.graphs
    assert graphs.sizes == [1, 2, 4]
    DECODE_CALLS.clear()
    assert answers_together(flash_engine, texts, 10) == expected
    assert graphs.replayed > 0
    assert set(DECODE_CALLS) <= {1, 2, 4} and 4 in DECODE_CALLS  # three rows replay the 4-row step, one padded


def test_captured_batch_sizes_cover_every_row_count():
    assert graph_sizes(1) == [1]
    assert graph_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
