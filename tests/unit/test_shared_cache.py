"""SharedCache: a value is made once however many threads ask for it at the same time; a failure
reaches every waiter and leaves nothing cached."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from snark.lru import SharedCache


def test_concurrent_askers_share_one_make():
    cache: SharedCache[bytes] = SharedCache(1024, size_of=len)
    started, release, calls = threading.Event(), threading.Event(), []

    def make() -> bytes:
        calls.append(1)
        started.set()
        release.wait(10)
        return b"frames"

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.get_or_make, "clip", make)
        started.wait(10)  # the first asker is making it now
        others = [pool.submit(cache.get_or_make, "clip", make) for _ in range(3)]
        release.set()
        assert {f.result(10) for f in [first, *others]} == {b"frames"}
    assert calls == [1] and cache.get("clip") == b"frames"


def test_a_failure_reaches_every_waiter_and_is_not_cached():
    cache: SharedCache[bytes] = SharedCache(1024, size_of=len)
    started, release = threading.Event(), threading.Event()

    def broken() -> bytes:
        started.set()
        release.wait(10)
        raise ValueError("not a video")

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(cache.get_or_make, "clip", broken)
        started.wait(10)
        waiter = pool.submit(cache.get_or_make, "clip", broken)
        release.set()
        for future in (first, waiter):
            with pytest.raises(ValueError, match="not a video"):
                future.result(10)
    assert cache.get("clip") is None
    assert cache.get_or_make("clip", lambda: b"fixed") == b"fixed"  # a later request tries again
