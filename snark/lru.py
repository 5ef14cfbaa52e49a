"""A least-recently-used cache bounded in bytes: the shape of every cache of media Snark keeps
(decoded images, the image processor's output, the vision tower's output).

``size_of`` says what an entry weighs; an entry heavier than the whole budget is not kept. Not
thread-safe on its own: a cache shared between threads holds a lock around its calls.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
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


class SharedCache(Generic[V]):
    """A thread-safe ``BytesLRU`` whose values are made once. A thread asking for a key that another
    is making waits for that result instead of making it again: four clients sending the same new
    video at once cost one decode, not four."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self._values: BytesLRU[V] = BytesLRU(max_bytes, size_of)
        self._lock = threading.Lock()
        self._making: dict[Hashable, Future[V]] = {}

    @property
    def hits(self) -> int:
        return self._values.hits

    @property
    def used_bytes(self) -> int:
        return self._values.used_bytes

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._values.get(key)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``: cached, being made by another thread (waited for), or made here.
        A failure reaches every waiter; nothing is cached for it."""
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                return value
            making = self._making.get(key)
            owner = making is None
            if making is None:
                making = self._making[key] = Future()
        if not owner:
            try:
                return making.result()
            except Exception as exc:  # each waiter gets its own error object: handlers annotate it
                raise copy.copy(exc) from exc
        try:
            value = make()
        except BaseException as exc:
            with self._lock:
                del self._making[key]
            making.set_exception(exc)
            raise
        with self._lock:
            self._values.put(key, value)
            del self._making[key]
        making.set_result(value)
        return value
