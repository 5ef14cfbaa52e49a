"""The KV cache running rows live in: insert rows after their prefill, drop them when they end.

Layout: one tensor per layer for keys and one for values, ``[row_capacity, kv_heads, columns,
head_dim]``. Running rows are compact (slots ``0 .. n-1``, in running order) and *column aligned*:
every row writes its next token at the same column ``end``, so one decode step is one batched
forward with no gathering. Row ``i``'s tokens sit in columns ``[starts[i], end)``; columns left of
its start hold nothing of its own and are masked out::

    column:   0 1 2 3 4 5 6 7 8      end = 9
    row 0:    . . a a a a a a a      start 2 (a prompt of 4, then 3 generated)
    row 1:    b b b b b b b b b      start 0
    row 2:    . . . . . c c c c      start 5 (joined three steps ago with a 4-token prompt)

A joining row's prompt is copied so that it ends at ``end``; a row that ends leaves its slot and
the rows after it move up. When the columns run out, the rows shift left past the columns no live
row uses any more (finished rows' columns), and only then does the tensor grow.

Memory is the rectangle ``row_capacity x columns``. ``footprint`` says what that rectangle would be
once some rows join, counting every row up to its last possible token, and the scheduler admits a
row only while that stays within the KV budget: a row that is running can always finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COLUMN_ALIGN = 64  # columns are allocated in multiples of this: fewer reallocations, friendlier shapes


def row_capacity(rows: int, max_rows: int) -> int:
    """Rows are allocated in powers of two (capped): growing from 3 to 4 rows copies nothing."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, max(max_rows, rows))


@dataclass(frozen=True)
class Joining:
    """A row about to join: its prompt length and the most tokens it may ever hold."""

    prompt_tokens: int
    total_tokens: int  # prompt + max_new_tokens


class RowCache:
    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, budget_tokens: int, max_rows: int, static: bool = False) -> None:  # fmt: skip
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.budget_tokens = budget_tokens
        self.max_rows = max_rows
        self.keys: list[torch.Tensor] = []  # per layer: [row_capacity, kv_heads, columns, head_dim]
        self.values: list[torch.Tensor] = []
        self.end = 0  # the column every row writes its next token to
        self.starts: list[int] = []  # per row: its first column
        self.limits: list[int] = []  # per row: one past the last column it may ever write
        # Compiled decode (see compiled.py): fixed allocation shapes, the write column as a tensor, and
        # ``step_rows`` (the row bucket) set for the duration of a compiled step.
        self.peak_allocated_tokens = 0  # the largest rectangle ever allocated (for tests and logs)
        self.static = static
        self.write_column = torch.zeros(1, dtype=torch.long, device=device)
        self.step_rows: int | None = None

    # --- sizes ----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.starts)

    @property
    def columns(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def allocated_tokens(self) -> int:
        return self.keys[0].shape[0] * self.columns if self.keys else 0

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _span(self, joining: Sequence[Joining] = ()) -> tuple[int, int]:
        """Every row's columns relative to ``end`` once ``joining`` rows join: (leftmost start - end,
        rightmost limit - end). A joining row's prompt ends at ``end``."""
        left = min([s - self.end for s in self.starts] + [-j.prompt_tokens for j in joining])
        right = max([limit - self.end for limit in self.limits] + [j.total_tokens - j.prompt_tokens for j in joining])
        return left, right

    def _allocation(self, rows: int, width: int) -> tuple[int, int]:
        """The smallest (rows, columns) tensors that hold ``rows`` rows spanning ``width`` columns."""
        if self.static:
            from snark.engine.transformers.compiled import column_bucket

            return self.max_rows, column_bucket(width)
        return row_capacity(rows, self.max_rows), width

    def footprint(self, joining: Sequence[Joining] = ()) -> int:
        """Tokens of cache the rectangle needs once ``joining`` rows join at the current step, each
        row counted up to its last possible token (live rows compacted to column 0)."""
        if not self.starts and not joining:
            return 0
        left, right = self._span(joining)
        rows, columns = self._allocation(self.num_rows + len(joining), right - left)
        return rows * columns

    def fits(self, joining: Sequence[Joining]) -> bool:
        return self.num_rows + len(joining) <= self.max_rows and self.footprint(joining) <= self.budget_tokens

    # --- joining and leaving ------------------------------------------------------------------------
    def insert(self, prefill_keys: Sequence[torch.Tensor], prefill_values: Sequence[torch.Tensor],
               joining: Sequence[Joining]) -> None:  # fmt: skip
        """Append rows whose prompts were just prefilled. ``prefill_keys[layer]`` is
        ``[len(joining), kv_heads, width, head_dim]``, left-padded: row j's prompt is its last
        ``joining[j].prompt_tokens`` columns."""
        self._make_room(joining)
        first = self.num_rows
        for j, row in enumerate(joining):
            slot, n = first + j, row.prompt_tokens
            for layer in range(self.num_layers):
                self.keys[layer][slot, :, self.end - n : self.end] = prefill_keys[layer][j, :, -n:]
                self.values[layer][slot, :, self.end - n : self.end] = prefill_values[layer][j, :, -n:]
            self.starts.append(self.end - n)
            self.limits.append(self.end - n + row.total_tokens)

    def remove(self, rows: Sequence[int]) -> None:
        """Drop rows (slot indices); the rows after them move up, keeping their order."""
        gone = set(rows)
        keep = [i for i in range(self.num_rows) if i not in gone]
        first_moved = next((i for i, row in enumerate(keep) if row != i), len(keep))
        if first_moved < len(keep):
            index = torch.tensor(keep[first_moved:], device=self.device)
            for tensor in (*self.keys, *self.values):
                tensor[first_moved : len(keep)] = tensor.index_select(0, index)
        self.starts = [self.starts[i] for i in keep]
        self.limits = [self.limits[i] for i in keep]
        if not keep:
            self.end = 0  # an empty cache starts over at column 0 (its tensors stay allocated)

    def clear(self) -> None:
        """Forget every row and free the memory (after a failed step)."""
        self.keys, self.values, self.starts, self.limits, self.end = [], [], [], [], 0

    # --- one decode step ------------------------------------------------------------------------
    def make_room_for_step(self) -> None:
        """Before a decode step: make sure column ``end`` exists."""
        if self.end >= self.columns:
            self._make_room(())

    def decode_mask(self) -> torch.Tensor:
        """``[rows, 1, 1, end + 1 - lo]`` bool: which columns each row attends to in this step."""
        lo = min(self.starts)
        columns = torch.arange(lo, self.end + 1, device=self.device)
        starts = torch.tensor(self.starts, device=self.device)
        return (columns[None, :] >= starts[:, None])[:, None, None, :]

    def padding_mask(self) -> torch.Tensor:
        """``[rows, end + 1 - lo]`` long: the same, as the 2-D mask flash-attention takes."""
        return self.decode_mask()[:, 0, 0, :].long()

    def static_decode_mask(self, rows: int) -> torch.Tensor:
        """``[rows, 1, 1, columns]`` bool for a compiled step over a row bucket: every allocated
        column, each row seeing its own up to ``end``; padding slots see only the column they write."""
        columns = torch.arange(self.columns, device=self.device)
        starts = torch.tensor(self.starts + [self.end] * (rows - self.num_rows), device=self.device)
        return ((columns[None, :] >= starts[:, None]) & (columns[None, :] <= self.end))[:, None, None, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The model's attention calls this once per layer with this step's ``[rows, kv_heads, 1,
        head_dim]`` keys and values; it returns every live column's keys and values."""
        if self.step_rows is not None:  # compiled: fixed shapes, the column as a tensor
            keys, values = self.keys[layer_idx][: self.step_rows], self.values[layer_idx][: self.step_rows]
            keys.index_copy_(2, self.write_column, key_states)
            values.index_copy_(2, self.write_column, value_states)
            return keys, values
        n, lo = self.num_rows, min(self.starts)
        self.keys[layer_idx][:n, :, self.end] = key_states[:, :, 0]
        self.values[layer_idx][:n, :, self.end] = value_states[:, :, 0]
        return self.keys[layer_idx][:n, :, lo : self.end + 1], self.values[layer_idx][:n, :, lo : self.end + 1]

    def advance(self) -> None:
        """After a decode step: every row wrote one column."""
        self.end += 1

    # --- layout ---------------------------------------------------------------------------------
    def _make_room(self, joining: Sequence[Joining]) -> None:
        """Make sure every row, live or ``joining``, has columns up to its limit. Rows stay where they
        are when they fit; otherwise the live block moves so that the leftmost needed column becomes 0,
        in tensors that are reallocated only when they are too small."""
        left, right = self._span(joining)
        rows = self.num_rows + len(joining)
        have_rows = self.keys[0].shape[0] if self.keys else 0
        if have_rows >= rows and self.end + left >= 0 and self.end + right <= self.columns:
            return  # the common case: nothing moves
        need_rows, need_columns = self._allocation(rows, right - left)
        need_rows = max(need_rows, have_rows)
        columns = self.columns
        if self.static:
            columns = max(columns, need_columns)
        elif need_rows > have_rows or need_columns > columns:
            grown = max(-(-need_columns // COLUMN_ALIGN) * COLUMN_ALIGN, 2 * columns)
            columns = max(need_columns, min(grown, self.budget_tokens // need_rows))
        end, shift = -left, -left - self.end  # column c of a live row moves to c + shift
        n, old_end = self.num_rows, self.end
        keys, values = [], []
        for layer in range(self.num_layers):
            k, v = self._tensor(need_rows, columns), self._tensor(need_rows, columns)
            if n:
                live = min(self.starts)
                k[:n, :, live + shift : old_end + shift] = self.keys[layer][:n, :, live:old_end]
                v[:n, :, live + shift : old_end + shift] = self.values[layer][:n, :, live:old_end]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.peak_allocated_tokens = max(self.peak_allocated_tokens, self.allocated_tokens)
        self.starts = [s + shift for s in self.starts]
        self.limits = [limit + shift for limit in self.limits]
        self.end = end

    def _tensor(self, rows: int, columns: int) -> torch.Tensor:
        tensor = torch.zeros(rows, self.kv_heads, columns, self.head_dim, dtype=self.dtype, device=self.device)
        if self.static:  # CUDA graphs then read and write it in place instead of copying it each step
            torch._dynamo.mark_static_address(tensor)
        return tensor
