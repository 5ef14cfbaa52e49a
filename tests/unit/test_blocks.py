"""KV blocks without a model: keys, the pool's reference counts and LRU eviction, the scheduler's
plans (budget, chunking, preemption), and decode grouping."""

from __future__ import annotations

import pytest

from snark.engine.request import GenerationRequest, PromptInputs
from snark.engine.tiny_model import build_tokenizer
from snark.engine.transformers.blocks import BlockPool, ImageSpan, block_keys
from snark.engine.transformers.model import group_by_length
from snark.engine.transformers.rows import Row
from snark.engine.transformers.scheduler import Scheduler
from snark.errors import InvalidRequest
from snark.values import SamplingParams

SIZE = 4


def test_keys_chain_so_equal_keys_mean_equal_prefixes():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], SIZE)
    b = block_keys([1, 2, 3, 4, 5, 6, 7, 0], SIZE)
    c = block_keys([0, 2, 3, 4, 5, 6, 7, 8], SIZE)
    assert len(a) == 2  # the partly filled third block has no key
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same tokens in block 1, different prefix


def test_keys_go_on_from_a_parent():
    tokens = list(range(12))
    whole = block_keys(tokens, SIZE)
    assert block_keys(tokens, SIZE, first=1, parent=whole[0]) == whole[1:]


def test_two_images_with_the_same_placeholders_never_share_keys():
    tokens = [7, 9, 9, 9, 9, 9, 9, 8]  # 6 placeholder tokens either way
    one = block_keys(tokens, SIZE, images=[ImageSpan(1, 6, b"cat")])
    other = block_keys(tokens, SIZE, images=[ImageSpan(1, 6, b"dog")])
    assert one[0] != other[0] and one[1] != other[1]
    assert block_keys(tokens, SIZE, images=[ImageSpan(1, 6, b"cat")]) == one


def test_a_salt_changes_every_key():
    tokens = list(range(12))
    assert all(x != y for x, y in zip(block_keys(tokens, SIZE, salt="tenant-a"), block_keys(tokens, SIZE, salt="b")))
    assert block_keys(tokens, SIZE, salt="a") == block_keys(tokens, SIZE, salt="a")


def test_freed_cached_blocks_are_found_until_evicted_least_recently_used_first():
    pool = BlockPool(5)  # 4 usable blocks
    first = pool.allocate(2)
    keys = block_keys(list(range(8)), SIZE)
    for block, key in zip(first, keys):
        pool.register(block, key)
    pool.release(first)
    assert pool.num_free == 4
    assert pool.find(keys) == first and pool.num_free == 2
    pool.release(first)
    taken = pool.allocate(2)  # never-cached blocks go first
    assert set(taken).isdisjoint(first) and pool.find(keys) == first
    pool.release(first)
    pool.release(taken)
    pool.allocate(3)  # the two plain blocks, then the oldest cached: the prefix's tail, released first
    assert pool.find(keys) == [first[0]]


def test_caching_off_finds_nothing():
    pool = BlockPool(4, enable_caching=False)
    block = pool.allocate(1)
    key = block_keys([1, 2, 3, 4], SIZE)
    pool.register(block[0], key[0])
    pool.release(block)
    assert pool.find(key) == []


def test_decode_groups_bound_padding():
    assert group_by_length([10, 12, 11]) == [[1, 2, 0]]
    groups = group_by_length([3000, 40, 50, 2900, 60])
    assert groups == [[0, 3], [4, 2, 1]]


# --- the scheduler ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _scheduler(blocks: int, *, budget: int = 64, rows: int = 8) -> Scheduler:
    return Scheduler(max_rows=rows, max_waiting=64, max_prefill_tokens=budget, pool=BlockPool(blocks), block_size=SIZE)


def _request(prompt: int, new: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=PromptInputs(list(range(100, 100 + prompt))), params=SamplingParams(max_new_tokens=new)
    )


def _maker(tokenizer):
    def make(request: GenerationRequest) -> Row:
        return Row(
            request,
            tokenizer=tokenizer,
            eos_token_ids=frozenset(),
            vocab_size=1000,
            device="cpu",
            image_token_id=9,
            video_token_id=10,
        )

    return make


def _run(scheduler: Scheduler, plan, sample: int = 5) -> None:
    for s in plan.rows:
        samples = s.samples
        scheduler.computed(s)
        if samples:
            s.row.tokens.append(sample)


def test_a_step_decodes_every_running_row_and_chunks_prompts_under_the_budget(tokenizer):
    scheduler = _scheduler(64, budget=10)
    make = _maker(tokenizer)
    scheduler.add(_request(6, 4))
    _run(scheduler, scheduler.schedule(make))  # the short prompt in one piece
    scheduler.add(_request(25, 4))
    plan = scheduler.schedule(make)
    assert [s.tokens for s in plan.rows] == [1, 10]  # a decode token, then a 10-token chunk
    _run(scheduler, plan)
    assert [s.tokens for s in scheduler.schedule(make).rows] == [1, 10]


def test_blocks_follow_the_tokens_a_row_holds(tokenizer):
    scheduler = _scheduler(64)
    make = _maker(tokenizer)
    scheduler.add(_request(6, 100))
    plan = scheduler.schedule(make)
    row = plan.rows[0].row
    assert len(row.blocks) == 2  # 6 tokens: one full block and one partly filled, not room for 106
    for _ in range(3):
        _run(scheduler, plan)
        plan = scheduler.schedule(make)
    assert len(row.blocks) == 3 and row.computed == 8  # 9 tokens computed after this step's one


def test_a_row_without_a_free_block_preempts_the_newest(tokenizer):
    scheduler = _scheduler(5, budget=64)  # 4 usable blocks of 4
    make = _maker(tokenizer)
    scheduler.add(_request(7, 20))
    scheduler.add(_request(7, 20))
    plan = scheduler.schedule(make)
    old, new = (s.row for s in plan.rows)
    _run(scheduler, plan)  # each holds 2 blocks, 8 tokens (7 computed)
    plan = scheduler.schedule(make)  # both decode into their second block
    _run(scheduler, plan)
    plan = scheduler.schedule(make)  # the old row needs a third block: the new one goes back
    assert plan.preempted == [new] and [s.row for s in plan.rows] == [old]
    assert new.computed == 0 and new.blocks == [] and scheduler.preempted == [new]
    assert len(new.tokens) == 9  # what it generated is kept, to be recomputed


def test_a_request_that_can_never_fit_is_refused(tokenizer):
    scheduler = _scheduler(5)
    with pytest.raises(InvalidRequest, match="KV cache"):
        scheduler.check_fits_alone(_request(10, 7))  # 17 tokens, 16 slots
    scheduler.check_fits_alone(_request(10, 6))


def test_a_joining_row_takes_its_cached_prefix_and_computes_the_rest(tokenizer):
    scheduler = _scheduler(64)
    make = _maker(tokenizer)
    scheduler.add(_request(10, 1))
    first = scheduler.schedule(make)
    _run(scheduler, first)
    first.rows[0].row.request.state = first.rows[0].row.request.state.FINISHED
    scheduler.retire()
    scheduler.add(_request(10, 1))
    plan = scheduler.schedule(make)
    row = plan.rows[0].row
    assert row.computed == 8 and plan.rows[0].tokens == 2  # two full blocks found
    assert scheduler.pool.hits == 8 and scheduler.pool.queries == 20
