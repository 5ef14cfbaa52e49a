"""Snark's engine side of constrained decoding: the grammar cache and its queue, and the CPU mask."""

from __future__ import annotations

import asyncio

import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from snark.engine.transformers.grammar import Grammars, _forbid_on_cpu
from snark.errors import InvalidRequest, Overloaded
from snark.structured.constraint import json_schema_output
from snark.values import StructuredOutput

VOCAB = 151936
SCHEMA_A = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 12}}, "required": ["a"]}
SCHEMA_B = {"type": "object", "properties": {"b": {"type": "string", "maxLength": 12}}, "required": ["b"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def grammars(tokenizer, max_queued: int = 8) -> Grammars:
    return Grammars(tokenizer, vocab_size=VOCAB, stop_token_ids=[151645, 151643], max_queued=max_queued)


def test_requests_with_one_schema_share_one_compile(tokenizer) -> None:
    cache = grammars(tokenizer)

    async def run():
        return await asyncio.gather(*(cache.compile(json_schema_output(SCHEMA_A)) for _ in range(4)))

    compiled = asyncio.run(run())
    assert all(c is compiled[0] for c in compiled) and len(cache._cache) == 1
    cache.close()


def test_new_schemas_past_the_queue_are_a_503(tokenizer) -> None:
    cache = grammars(tokenizer, max_queued=1)

    async def run():
        first = asyncio.ensure_future(cache.compile(json_schema_output(SCHEMA_A)))
        await asyncio.sleep(0)  # the first compile is now queued or running
        with pytest.raises(Overloaded) as refused:
            await cache.compile(json_schema_output(SCHEMA_B))
        assert "SNARK_MAX_WAITING_REQUESTS" in refused.value.message
        await first  # and the first one is served
        return await cache.compile(json_schema_output(SCHEMA_B))  # room again

    assert asyncio.run(run()) is not None
    cache.close()


def test_a_schema_that_cannot_compile_is_a_400_every_time(tokenizer) -> None:
    cache = grammars(tokenizer)
    broken = StructuredOutput("json_schema", '{"type": "string", "pattern": "(unclosed"}')

    async def run():
        for _ in range(2):  # the failure is not cached: the second request gets the same 400
            with pytest.raises(InvalidRequest):
                await cache.compile(broken)

    asyncio.run(run())
    assert len(cache._cache) == 0
    cache.close()


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3]])
def test_the_cpu_mask_forbids_what_xgrammar_forbids(rows) -> None:
    generator = torch.Generator().manual_seed(len(rows))
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (VOCAB + 31) // 32), dtype=torch.int32, generator=generator)
    bitmask[0, :100] = 0  # long runs of forbidden tokens, as after a key
    logits = torch.randn(4, VOCAB, generator=generator)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, indices=rows)
    _forbid_on_cpu(logits, bitmask, rows)
    assert torch.equal(logits, expected)
