"""A least-recently-used cache bounded in bytes: the shape of every cache of media Snark keeps
(decoded images, the image processor's output, the vision tower's output).

``size_of`` says what an entry weighs; an entry heavier than the whole budget is not kept. Not
thread-safe on its own: a cache shared between threads holds a lock around its calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BytesLRU(Generic[V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self.queries = 0  # lookups (for /metrics and tests)
        self.hits = 0

    def get(self, key: Hashable) -> V | None:
        self.queries += 1
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        if size > self.max_bytes or key in self._entries:
            return
        while self.used_bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= self._size_of(evicted)
        self._entries[key] = value
        self.used_bytes += size
