"""Images and videos -> the vision tower's inputs (pixel patches and grid), reused for one seen again.

Chat UIs and screenshot agents re-send the same images at every turn; resizing and normalising a
1024x768 image costs tens of milliseconds of each turn's time to first token. The processor's output
for an image is a function of its pixels and its pixel bounds (each image has its own: a request may
send one image at low and another at high detail), so it is kept, by a digest of both, in a small
least-recently-used cache bounded in bytes. Each image's ``key`` (its content and processed grid,
which is all its patches depend on) is what the engine's vision-output and prefix caches are keyed by:
two resolutions of one image never share an entry, and two bounds that give one size do.

A video arrives sampled and resized already (``snark.video``); ``VideoInputs`` runs the model's
video processor on its frames (normalised, cut into 2-frame x 14 x 14 patches) under its own key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from snark.lru import BytesLRU, SharedCache
from snark.values import ImagePart
from snark.video.clip import Video
from snark.video.sampling import FRAME_FACTOR, PIXEL_FACTOR

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

    def __call__(self, images: Sequence[Image.Image | ImagePart], *, min_pixels: int, max_pixels: int) -> VisionInputs:
        """Each image's patches and grid: an ``ImagePart`` within its own bounds, a bare image within
        ``min_pixels`` / ``max_pixels``."""
        parts = [p if isinstance(p, ImagePart) else ImagePart(p, min_pixels, max_pixels) for p in images]
        contents = [_content_digest(p.image) for p in parts]
        digests = [
            hashlib.sha256(c + f" {p.min_pixels} {p.max_pixels}".encode()).digest() for c, p in zip(contents, parts)
        ]
        with self._lock:
            found = [self._entries.get(d) for d in digests]
        missing: dict[tuple[int, int], list[int]] = {}  # the images to process, by their bounds
        for i, entry in enumerate(found):
            if entry is None:
                missing.setdefault((parts[i].min_pixels, parts[i].max_pixels), []).append(i)
        for (least, most), indices in missing.items():  # one processor call per pair of bounds
            out = self.image_processor(
                images=[parts[i].image for i in indices],
                size={"shortest_edge": least, "longest_edge": most},
                return_tensors="pt",
            )
            grids, pixels = out["image_grid_thw"], out["pixel_values"]
            patches = pixels.split(grids.prod(-1).tolist()) if pixels is not None else [None] * len(indices)
            with self._lock:
                for i, grid, values in zip(indices, grids, patches):
                    entry = found[i] = (values, grid)
                    self._entries.put(digests[i], entry)
            self.processed += len(indices)
        entries = [entry for entry in found if entry is not None]  # every image's, now
        image_pixels = [values for values, _ in entries if values is not None]
        pixel_values = torch.cat(image_pixels) if image_pixels else None
        grids = torch.stack([grid for _, grid in entries])
        keys = tuple(hashlib.sha256(c + str(g.tolist()).encode()).digest() for c, (_, g) in zip(contents, entries))
        return VisionInputs(pixel_values=pixel_values, image_grid_thw=grids, keys=keys)


def _entry_bytes(entry: tuple[torch.Tensor | None, torch.Tensor]) -> int:
    pixels = entry[0]
    return 0 if pixels is None else pixels.numel() * pixels.element_size()


def _content_digest(image: Image.Image) -> bytes:
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return digest.digest()


@dataclass(frozen=True)
class VideoTensors:
    pixel_values: torch.Tensor | None  # [patches, channels * temporal * patch * patch]; None: sizes only
    grid_thw: torch.Tensor  # [videos, 3]
    second_per_grid_ts: tuple[float, ...]
    keys: tuple[bytes, ...]


class VideoInputs:
    """Runs ``video_processor`` on each video it has not seen, once however many prompts bring it at
    the same time; without a processor (``None``), gives the grids only (the vLLM engine's prompts,
    whose pixels vLLM computes). Thread-safe."""

    def __init__(self, video_processor, *, patch_size: int = 14, cache_bytes: int = CACHE_BYTES) -> None:
        self.video_processor = video_processor
        self.patch_size = patch_size
        self._entries: SharedCache[torch.Tensor] = SharedCache(
            cache_bytes, size_of=lambda t: t.numel() * t.element_size()
        )
        self.processed = 0  # videos that went through the processor (tests)

    def __call__(self, videos: list[Video]) -> VideoTensors:
        grids = torch.tensor(
            [[v.num_frames // FRAME_FACTOR, v.height // self.patch_size, v.width // self.patch_size] for v in videos],
            dtype=torch.long,
        )
        keys = tuple(v.key for v in videos)
        seconds = tuple(v.second_per_grid_t for v in videos)
        if self.video_processor is None:
            return VideoTensors(pixel_values=None, grid_thw=grids, second_per_grid_ts=seconds, keys=keys)
        pixels = [self._entries.get_or_make(v.key, partial(self._process, v)) for v in videos]
        return VideoTensors(pixel_values=torch.cat(pixels), grid_thw=grids, second_per_grid_ts=seconds, keys=keys)

    def _process(self, video: Video) -> torch.Tensor:
        """One video's patches ``[patches, dim]``. Its frames are at their final size already (sides
        multiples of 28), so the processor's resize keeps them: bounds that hold their area do."""
        out = self.video_processor(
            videos=[video.frames],
            size={"shortest_edge": PIXEL_FACTOR**2, "longest_edge": video.height * video.width},
            do_sample_frames=False,
            cap_pixels_per_frame=False,
            return_tensors="pt",
        )
        grid = [video.num_frames // FRAME_FACTOR, video.height // self.patch_size, video.width // self.patch_size]
        if out["video_grid_thw"].tolist() != [grid]:
            raise RuntimeError(
                f"the video processor gave grid {out['video_grid_thw'].tolist()} for frames sized {grid}"
            )
        self.processed += 1
        return out["pixel_values_videos"]
