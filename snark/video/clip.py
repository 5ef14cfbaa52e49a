"""``Video``: one clip as the model will see it: sampled frames at their final size, and their times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Video:
    """Sampled RGB frames ``[frames, height, width, 3]`` uint8, already resized (sides multiples of 28,
    an even frame count), and where they sit in time.

    ``second_per_grid_t`` is the time one frame pair spans, from the frames' real timestamps: the
    model places each pair at ``pair * second_per_grid_t`` seconds in its 3-D rope (M-RoPE), so a
    variable frame rate or a low sampling rate still reads as the right time. ``key`` is a digest of
    the source's bytes and how it was sampled: the caches (processor output, vision tower output,
    prefix KV blocks) know a clip by it. Shared between requests: nothing may change the frames."""

    frames: np.ndarray
    timestamps: tuple[float, ...]  # seconds, one per frame, in the source's time
    second_per_grid_t: float
    key: bytes

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def sample_fps(self) -> float:
        """Frames a second of the sampled clip (what vLLM and Qwen's processor take as ``fps``)."""
        return 2 / self.second_per_grid_t

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)
