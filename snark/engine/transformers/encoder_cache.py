"""The vision tower's outputs by image, so an image asked about again is encoded once.

Keys are ``ImageSpan.key`` (the image's content and processed size); values are the image's
features, ``[image_tokens, hidden]``, as the language model takes them. Bounded in bytes
(SNARK_ENCODER_CACHE_MIB); least recently used first out. An image larger than the whole budget is
not kept (its row holds its features while its tokens are prefilled).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.queries = 0  # images looked up (for /metrics)
        self.hits = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        self.queries += 1
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.budget_bytes or key in self._entries:
            return
        while self.used_bytes + size > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = features
        self.used_bytes += size
