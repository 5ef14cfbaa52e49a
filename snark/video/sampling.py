"""How many frames of a video the model sees, and at what size: Qwen's own rules (``qwen-vl-utils``).

Qwen2.5-VL was trained on videos sampled this way:

* **frames**: 2 a second by default (``fps``), at least ``min_frames`` (4) and at most ``max_frames``
  (768), never more than the video has, and always an even number: the vision tower reads frames in
  pairs (its temporal patch is 2 frames deep), so each pair becomes one grid step;
* **size**: every frame resized alike, each side a multiple of 28 (a 14-pixel patch, merged 2 x 2),
  within ``min_pixels`` and ``max_pixels`` a frame, and the whole clip within ``total_pixels``: a
  longer clip gets smaller frames (a frame's cap is ``total_pixels / frames * 2``), so a video costs
  at most ``total_pixels / 784`` tokens.

``VideoSampling`` is one video's request after the server's caps were applied (``VideoCaps.clamp``):
a client may ask for fewer frames or pixels than the server allows, never more. Pure arithmetic,
tested against ``qwen_vl_utils`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

FRAME_FACTOR = 2  # frames per temporal patch: a video's frame count is even
PIXEL_FACTOR = 28  # a 14-pixel patch merged 2 x 2: frame sides are multiples of this
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VideoSampling:
    """One video's sampling, within the server's caps. ``nframes`` (a fixed count) replaces the
    fps rule when set; ``start_s`` / ``end_s`` cut a range of the video (seconds, None: its ends)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    nframes: int | None = None
    min_pixels: int = 128 * PIXEL_FACTOR**2  # one frame
    max_pixels: int = 768 * PIXEL_FACTOR**2  # one frame
    total_pixels: int = 16384 * PIXEL_FACTOR**2  # the clip: at most this / 784 tokens
    start_s: float | None = None
    end_s: float | None = None

    def frame_count(self, total_frames: int, video_fps: float) -> int:
        """The frames to sample from ``total_frames`` frames played at ``video_fps`` (qwen-vl-utils'
        ``smart_nframes``). A video of one frame gives 2 (the frame twice), as a frame list does."""
        if self.nframes is not None:
            count = _round_by(self.nframes, FRAME_FACTOR)
        else:
            least = _ceil_by(self.min_frames, FRAME_FACTOR)
            most = _floor_by(min(self.max_frames, total_frames), FRAME_FACTOR)
            wanted = total_frames / video_fps * self.fps
            count = _floor_by(min(max(wanted, least), most, total_frames), FRAME_FACTOR)
        count = min(count, _floor_by(total_frames, FRAME_FACTOR), _floor_by(self.max_frames, FRAME_FACTOR))
        return max(count, FRAME_FACTOR)

    def frame_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """(height, width) every frame is resized to, for a clip of ``frames`` frames (qwen-vl-utils'
        ``fetch_video``: the per-frame cap shrinks as the clip grows)."""
        share = self.total_pixels / frames * FRAME_FACTOR
        max_pixels = min(self.max_pixels, max(min(self.max_pixels, share), int(self.min_pixels * 1.05)))
        return smart_resize(height, width, min_pixels=self.min_pixels, max_pixels=max_pixels)

    def tokens(self, height: int, width: int, frames: int) -> int:
        """The prompt tokens such a clip costs: one per 28 x 28 pixels of each frame pair."""
        h, w = self.frame_size(height, width, frames)
        return (frames // FRAME_FACTOR) * (h // PIXEL_FACTOR) * (w // PIXEL_FACTOR)


@dataclass(frozen=True)
class VideoCaps:
    """The server's defaults and caps for video sampling (SNARK_VIDEO_* settings)."""

    fps: float = 2.0
    max_frames: int = 768
    min_pixels: int = 128 * PIXEL_FACTOR**2
    max_pixels: int = 768 * PIXEL_FACTOR**2
    total_pixels: int = 16384 * PIXEL_FACTOR**2

    @property
    def default(self) -> VideoSampling:
        return VideoSampling(
            fps=self.fps,
            max_frames=self.max_frames,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            total_pixels=self.total_pixels,
        )

    def clamp(
        self,
        *,
        fps: float | None = None,
        nframes: int | None = None,
        min_frames: int | None = None,
        max_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        total_pixels: int | None = None,
        start_s: float | None = None,
        end_s: float | None = None,
    ) -> VideoSampling:
        """A request's fields (None: the server's default) within the caps: frames and pixels may be
        lowered, never raised above the server's settings."""
        base = self.default
        most_frames = min(max_frames, self.max_frames) if max_frames is not None else self.max_frames
        top = min(max_pixels, self.max_pixels) if max_pixels is not None else self.max_pixels
        least = min(max(min_pixels, PIXEL_FACTOR**2), top) if min_pixels is not None else min(self.min_pixels, top)
        return replace(
            base,
            fps=fps if fps is not None else base.fps,
            min_frames=min(min_frames, most_frames) if min_frames is not None else min(base.min_frames, most_frames),
            max_frames=most_frames,
            nframes=min(nframes, most_frames) if nframes is not None else None,
            min_pixels=least,
            max_pixels=top,
            total_pixels=min(total_pixels, self.total_pixels) if total_pixels is not None else self.total_pixels,
            start_s=start_s,
            end_s=end_s,
        )


def smart_resize(
    height: int, width: int, *, min_pixels: int, max_pixels: float, factor: int = PIXEL_FACTOR
) -> tuple[int, int]:
    """Each side a multiple of ``factor``, the area within [min_pixels, max_pixels], the aspect
    ratio kept as closely as that allows (Qwen's ``smart_resize``)."""
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor
