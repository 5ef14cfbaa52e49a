"""The CUDA attention path (flash-attn's paged varlen kernel) on CPU: no GPU here, so a reference
implementation of ``flash_attn_varlen_func``'s documented semantics stands in for the kernel (causal
masks aligned bottom-right, keys read through the block table), and the arguments Snark builds for it
must give the same greedy output as the SDPA path: batched, chunked and from the prefix cache."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from snark.engine.request import ChatTurn, SamplingParams
from tests.conftest import start_engine


CALLS: list[int] = []  # rows of each call


def reference_varlen(q, k_cache, v_cache, *, causal, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k):  # fmt: skip
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
        out[q0:q1] = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.fixture
def flash_engine(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=reference_varlen))
    engine = start_engine(tiny_model_dir, max_batch_size=4, max_prefill_tokens=24)
    engine.runner.flash = True
    yield engine
    engine.stop()


def test_the_flash_arguments_give_the_sdpa_path_s_output(flash_engine, tiny_engine):
    prompts = [
        flash_engine.prompts.build([ChatTurn("user", [text])], min_pixels=3136, max_pixels=200_000)
        for text in ("Tell me a story about bicycles. " * 4, "Hi.", "Why is the sky blue? " * 3)
    ]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    async def together(engine):
        return [r.text for r in await asyncio.gather(*[engine.generate(p, params) for p in prompts])]

    expected = asyncio.run(together(tiny_engine))
    assert asyncio.run(together(flash_engine)) == expected  # chunked prompts beside decoding rows
    assert asyncio.run(together(flash_engine)) == expected  # again, from the prefix cache
    assert flash_engine.prefix_cache_counts[1] > 0
    assert max(CALLS) == 3  # the kernel ran, over every row of a step at once
