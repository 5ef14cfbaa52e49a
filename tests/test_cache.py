"""The row cache on its own, with small tensors: where rows' keys land, what each row may see, and
how much memory a layout takes. Each cell's value encodes (row, token) so every move is checked."""

from __future__ import annotations

import pytest
import torch

from snark.engine.transformers.cache import Joining, RowCache, row_capacity


def _cache(budget_tokens: int = 10_000, max_rows: int = 8, static: bool = False) -> RowCache:
    return RowCache(num_layers=2, kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"),
                    budget_tokens=budget_tokens, max_rows=max_rows, static=static)  # fmt: skip


def _prefill(rows: list[tuple[int, int]], width: int) -> list[torch.Tensor]:
    """Left-padded prefill keys for (row id, prompt length): token t of row r holds r * 1000 + t."""
    keys = torch.full((len(rows), 1, width, 1), -1.0)
    for j, (row_id, length) in enumerate(rows):
        keys[j, 0, width - length :, 0] = torch.arange(length, dtype=torch.float32) + row_id * 1000
    return [keys, keys + 0.5]  # two layers, different values


def _join(cache: RowCache, rows: list[tuple[int, int, int]]) -> None:
    """rows: (row id, prompt length, max new tokens)."""
    width = max(length for _, length, _ in rows)
    keys = _prefill([(r, n) for r, n, _ in rows], width)
    cache.insert(keys, [k + 100 for k in keys], [Joining(n, n + m) for _, n, m in rows])


def _step(cache: RowCache, row_ids: list[int], token: int) -> None:
    """One decode step writing r * 1000 + token for each row."""
    cache.make_room_for_step()
    new = torch.tensor([r * 1000 + token for r in row_ids], dtype=torch.float32).view(-1, 1, 1, 1)
    for layer in range(cache.num_layers):
        cache.update(new + 0.5 * layer, new + 0.5 * layer + 100, layer)
    cache.advance()


def _row_tokens(cache: RowCache, slot: int, layer: int = 0) -> list[float]:
    return cache.keys[layer][slot, 0, cache.starts[slot] : cache.end, 0].tolist()


def test_rows_joining_later_end_at_the_shared_column_and_keep_their_tokens():
    cache = _cache()
    _join(cache, [(1, 3, 10), (2, 5, 10)])
    assert cache.end == 5 and cache.starts == [2, 0]
    _step(cache, [1, 2], 100)
    _join(cache, [(3, 2, 10)])
    _step(cache, [1, 2, 3], 101)
    assert _row_tokens(cache, 0) == [1000, 1001, 1002, 1100, 1101]
    assert _row_tokens(cache, 1) == [2000, 2001, 2002, 2003, 2004, 2100, 2101]
    assert _row_tokens(cache, 2) == [3000, 3001, 3101]
    assert _row_tokens(cache, 2, layer=1) == [3000.5, 3001.5, 3101.5]


def test_a_joining_prompt_longer_than_the_shared_column_moves_the_others_right():
    cache = _cache()
    _join(cache, [(1, 2, 10)])
    _step(cache, [1], 100)
    _join(cache, [(2, 9, 10)])
    assert cache.end == 9
    assert _row_tokens(cache, 0) == [1000, 1001, 1100]
    assert _row_tokens(cache, 1) == [2000 + t for t in range(9)]


def test_decode_mask_shows_each_row_only_its_own_columns():
    cache = _cache()
    _join(cache, [(1, 2, 10), (2, 4, 10)])
    mask = cache.decode_mask()  # columns 0 .. end (the one this step writes)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[:, 0, 0].tolist() == [[False, False, True, True, True], [True, True, True, True, True]]


def test_removing_rows_keeps_the_order_and_contents_of_the_rest():
    cache = _cache()
    _join(cache, [(1, 2, 10), (2, 3, 10), (3, 4, 10), (4, 1, 10)])
    cache.remove([0, 2])
    assert cache.num_rows == 2
    assert _row_tokens(cache, 0) == [2000, 2001, 2002]
    assert _row_tokens(cache, 1) == [4000]
    _step(cache, [2, 4], 100)
    assert _row_tokens(cache, 1) == [4000, 4100]
    cache.remove([0, 1])
    assert cache.num_rows == 0 and cache.end == 0


def test_a_row_that_needs_columns_past_the_end_moves_the_live_rows_left_before_anything_grows():
    cache = _cache(budget_tokens=100)
    assert cache.fits([Joining(8, 10), Joining(2, 42)])  # 2 rows x 48 columns
    _join(cache, [(1, 8, 2), (2, 2, 40)])  # row 2: columns 6 .. 47
    assert cache.columns == 50  # grown with slack, within the budget (100 // 2 rows)
    cache.remove([0])  # the long prompt's row ends: columns 0 .. 5 are free
    for token in (100, 101):
        _step(cache, [2], token)
    _join(cache, [(3, 2, 44)])  # would reach column 10 - 2 + 44 = 52 > 50: row 2 moves to column 0
    assert cache.columns == 50 and cache.starts == [0, 2] and cache.end == 4
    assert _row_tokens(cache, 0) == [2000, 2001, 2100, 2101]
    assert _row_tokens(cache, 1) == [3000, 3001]
    assert cache.peak_allocated_tokens <= 100


def test_footprint_counts_every_row_to_its_last_possible_token():
    cache = _cache()
    assert cache.footprint([Joining(10, 30)]) == 30
    _join(cache, [(1, 10, 20)])  # columns 0..29 reserved
    _step(cache, [1], 100)
    # A 4-token prompt joining now starts at column 7 and may reach 7 + 4 + 50 = 61: two rows x 61.
    assert cache.footprint([Joining(4, 54)]) == row_capacity(2, 8) * 61
    assert cache.fits([Joining(4, 54)])
    assert not _cache(budget_tokens=100).fits([Joining(60, 120)])


def test_allocation_never_exceeds_the_budget_while_admission_respects_it():
    cache = _cache(budget_tokens=200, max_rows=4)
    joined = []
    for row_id in range(1, 6):
        request = Joining(10, 50)
        if cache.fits(joined[-0:] and [request] or [request]):
            _join(cache, [(row_id, 10, 40)])
            joined.append(request)
    assert cache.num_rows == 4  # 4 rows x 50 columns: exactly the budget; a 5th never fits
    assert cache.peak_allocated_tokens <= 200
    assert not cache.fits([Joining(1, 2)])  # no free row


def test_static_layout_uses_power_of_two_columns_and_every_row():
    cache = _cache(static=True, max_rows=4)
    _join(cache, [(1, 3, 10)])
    assert cache.keys[0].shape[0] == 4 and cache.columns == 2048
    mask = cache.static_decode_mask(2)
    assert mask.shape == (2, 1, 1, 2048)
    assert mask[0, 0, 0, :4].tolist() == [True, True, True, True] and not mask[0, 0, 0, 4:].any()
    assert mask[1, 0, 0].nonzero().flatten().tolist() == [3]  # a padding slot sees only its own column


@pytest.mark.parametrize("rows,expected", [(1, 1), (2, 2), (3, 4), (5, 8), (9, 12)])
def test_row_capacity_is_a_power_of_two_capped_at_the_max(rows, expected):
    assert row_capacity(rows, 12) == expected
