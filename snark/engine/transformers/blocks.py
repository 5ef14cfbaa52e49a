"""KV cache blocks: who holds which block, and which full blocks can be reused by a later request.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each (``kv_cache.py`` holds the
tensors). A row holds a *block table*: the ids of the blocks its tokens live in, in order, so token
``i`` of the row sits in slot ``i % block_size`` of block ``table[i // block_size]``. Memory is in
proportion to the tokens rows hold, plus at most one partly filled block per row.

Automatic prefix caching: a block that is full gets a key, the hash of its tokens chained to the key
of the block before it (so equal keys mean equal prefixes), and stays findable by that key after
its row ends, until its slot is needed again. A block that holds image placeholder tokens also
hashes each image's content and processed size (``ImageSpan.key``): two different images of the same
size give the same placeholder tokens, and must never share cached keys and values. A request's
``cache_salt`` goes into its first block's key, so requests with different salts share nothing.

Block 0 is the null block: never handed out, zeroed, used to pad block tables.

Free blocks wait in least-recently-used order; a free block that still has a key can be revived by
a later request with the same prefix (a *hit*) until it is evicted, i.e. handed out for new tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK = 0


@dataclass(frozen=True)
class ImageSpan:
    """One image's (or video's) placeholder tokens in a prompt: ``[start, start + length)``, and its
    cache key (its content and processed size, see ``image_inputs.py``). ``ordinal`` counts it among
    the prompt's images, or among its videos when ``video``."""

    start: int
    length: int
    key: bytes
    video: bool = False
    ordinal: int = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens (the last one possibly partly filled)."""
    return -(-tokens // block_size)


def padded_table(blocks: list[int], width: int) -> list[int]:
    """A row's block table cut or padded with the null block to ``width`` entries (batched tables)."""
    return blocks[:width] + [NULL_BLOCK] * (width - len(blocks[:width]))


def block_keys(
    tokens: Sequence[int],
    block_size: int,
    *,
    images: Sequence[ImageSpan] = (),
    salt: str | None = None,
    first: int = 0,
    parent: bytes = b"",
) -> list[bytes]:
    """The keys of the full blocks ``first, first + 1, ...`` of a row whose tokens (from its start)
    are ``tokens``, each chained to the one before (block ``first`` to ``parent``, the key of block
    ``first - 1``)."""
    keys: list[bytes] = []
    for index in range(first, len(tokens) // block_size):
        start, end = index * block_size, (index + 1) * block_size
        digest = hashlib.sha256(parent)
        digest.update(struct.pack(f"<{block_size}q", *tokens[start:end]))
        for image in images:
            if image.start < end and start < image.start + image.length:
                digest.update(b"image" + image.key)
        if index == 0 and salt:
            digest.update(b"salt" + salt.encode())
        parent = digest.digest()
        keys.append(parent)
    return keys


class BlockPool:
    """Reference counts, the free list (LRU order) and the key -> block map of cached blocks."""

    def __init__(self, num_blocks: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding it
        # Free blocks, oldest first: never-used ones first, then each freed block at the end.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.high_water = 1  # blocks [1, high_water) have been handed out at least once
        self.queries = 0  # prompt tokens looked up in the prefix cache (for /metrics)
        self.hits = 0  # of which found

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used / (self.num_blocks - 1)

    def allocate(self, count: int) -> list[int]:
        """``count`` blocks for new tokens, evicting the least recently used cached ones."""
        if count > len(self.free):
            raise RuntimeError(f"asked for {count} KV blocks with {len(self.free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            self.high_water = max(self.high_water, block + 1)
            blocks.append(block)
        return blocks

    def find(self, keys: Sequence[bytes]) -> list[int]:
        """The longest run of cached blocks for ``keys`` (a prefix's chained keys), taken: their
        reference counts go up and free ones leave the free list."""
        found = []
        if self.enable_caching:
            for key in keys:
                block = self.cached.get(key)
                if block is None:
                    break
                found.append(block)
        for block in found:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        return found

    def can_take(self, new_blocks: int) -> bool:
        return new_blocks <= len(self.free)

    def register(self, block: int, key: bytes) -> None:
        """``block`` is now full with the prefix ``key`` names: later requests may reuse it."""
        if not self.enable_caching or self.key_of[block] is not None:
            return
        if key not in self.cached:  # an equal block already cached stays the one found
            self.cached[key] = block
            self.key_of[block] = key

    def release(self, blocks: Sequence[int]) -> None:
        """A row lets go of its blocks (last first, so its tail is evicted before its shared prefix)."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.key_of[block] is None:
                    self.free[block] = None
                    self.free.move_to_end(block, last=False)  # nothing to keep: reuse it first
                else:
                    self.free[block] = None

    def _forget(self, block: int) -> None:
        key = self.key_of[block]
        if key is not None:
            self.key_of[block] = None
            if self.cached.get(key) == block:
                del self.cached[key]
