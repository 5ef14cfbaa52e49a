"""The vision tower's outputs by image, so an image asked about again is encoded once.

Keys are ``ImageSpan.key`` (the image's content and processed size); values are the image's
features, ``[image_tokens, hidden]``, as the language model takes them. Bounded in bytes
(SNARK_ENCODER_CACHE_MIB); least recently used first out. An image larger than the whole budget is
not kept (its row holds its features while its tokens are prefilled).
"""

from __future__ import annotations

import torch

from snark.lru import BytesLRU


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EncoderCache(BytesLRU[torch.Tensor]):
    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes, size_of=tensor_bytes)
