"""The paged KV cache's tensors: per layer, keys and values in ``[num_blocks, block_size, kv_heads,
head_dim]`` (which block holds what is ``blocks.py``'s business).

The tensors are allocated once, uninitialised, at the budget's size (on CPU the operating system
then backs only the pages that are written). A block is zeroed the first time it is handed out:
attention reads the unwritten tail of a row's last block (masked out), and masked garbage could
still be NaN, which survives a zero weight.
"""

from __future__ import annotations

import torch

ZERO_CHUNK_BLOCKS = 256  # blocks zeroed at a time as new ones come into use


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_bytes = self.bytes_per_block(
            num_layers=num_layers, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype
        )
        self.zeroed = 0  # blocks [0, zeroed) have been zeroed
        self.ensure_zeroed(1)  # the null block

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def ensure_zeroed(self, high_water: int) -> None:
        """Zero the blocks below ``high_water`` that never were (in chunks, rarely)."""
        if high_water <= self.zeroed:
            return
        end = min(self.num_blocks, max(high_water, self.zeroed + ZERO_CHUNK_BLOCKS))
        for tensor in (*self.keys, *self.values):
            tensor[self.zeroed : end].zero_()
        self.zeroed = end

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's ``[tokens, kv_heads, head_dim]`` keys and values at flat ``slots``
        (``block * block_size + offset``)."""
        self.keys[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, keys)
        self.values[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, values)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks in ``tables`` ([rows, blocks]), as ``[rows, kv_heads,
        blocks * block_size, head_dim]`` (a copy, laid out for attention)."""
        rows, blocks = tables.shape
        shape = (rows, blocks * self.block_size, self.kv_heads, self.head_dim)
        flat = tables.flatten()  # index_select copies whole blocks: about 4x advanced indexing on CPU
        keys = self.keys[layer].index_select(0, flat).view(shape).transpose(1, 2)
        values = self.values[layer].index_select(0, flat).view(shape).transpose(1, 2)
        return keys, values
