"""Images -> the vision tower's inputs (pixel patches and grid), reused for an image seen again.

Chat UIs and screenshot agents re-send the same images at every turn; resizing and normalising a
1024x768 image costs tens of milliseconds of each turn's time to first token. The processor's output
for an image is a function of its pixels and the request's pixel bounds, so it is kept, by a digest of
both, in a small least-recently-used cache bounded in bytes. Each image's ``key`` (its content and
processed grid) is what the engine's vision-output and prefix caches are keyed by.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch
from PIL import Image

from snark.lru import BytesLRU

CACHE_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class VisionInputs:
    pixel_values: torch.Tensor | None  # [patches, channels * temporal * patch * patch]; None: sizes only
    image_grid_thw: torch.Tensor  # [images, 3]
    keys: tuple[bytes, ...]  # per image: content and processed size


class ImageInputs:
    """Runs ``image_processor`` on the images it has not seen under the same bounds. Thread-safe:
    prompts are built in a thread pool."""

    def __init__(self, image_processor, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.image_processor = image_processor
        self._entries: BytesLRU[tuple[torch.Tensor | None, torch.Tensor]] = BytesLRU(cache_bytes, size_of=_entry_bytes)
        self._lock = threading.Lock()
        self.processed = 0  # images that went through the processor (tests)

    @property
    def used_bytes(self) -> int:
        """Bytes of processor output held for images seen again."""
        return self._entries.used_bytes

    def __call__(self, images: list[Image.Image], *, min_pixels: int, max_pixels: int) -> VisionInputs:
        digests = [_digest(image, min_pixels, max_pixels) for image in images]
        with self._lock:
            found = [self._entries.get(d) for d in digests]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            out = self.image_processor(
                images=[images[i] for i in missing],
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                return_tensors="pt",
            )
            grids, pixels = out["image_grid_thw"], out["pixel_values"]
            patches = pixels.split(grids.prod(-1).tolist()) if pixels is not None else [None] * len(missing)
            with self._lock:
                for i, grid, values in zip(missing, grids, patches):
                    found[i] = (values, grid)
                    self._entries.put(digests[i], found[i])
            self.processed += len(missing)
        pixel_values = None if found[0][0] is None else torch.cat([values for values, _ in found])
        grids = torch.stack([grid for _, grid in found])
        keys = tuple(hashlib.sha256(d + str(g.tolist()).encode()).digest() for d, (_, g) in zip(digests, found))
        return VisionInputs(pixel_values=pixel_values, image_grid_thw=grids, keys=keys)


def _entry_bytes(entry: tuple[torch.Tensor | None, torch.Tensor]) -> int:
    pixels = entry[0]
    return 0 if pixels is None else pixels.numel() * pixels.element_size()


def _digest(image: Image.Image, min_pixels: int, max_pixels: int) -> bytes:
    digest = hashlib.sha256(f"{image.mode} {image.size} {min_pixels} {max_pixels}".encode())
    digest.update(image.tobytes())
    return digest.digest()
