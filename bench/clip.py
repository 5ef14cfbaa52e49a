"""The short clip the ``video`` workload asks about, made here with PyAV (H.264 in MP4, as phones and
screen recorders write it): a square that crosses the picture and changes colour, a ball that
bounces, and a bar that fills up as the clip plays, over a colour gradient. Every frame differs from
the last, so a server's sampled frames are not one picture repeated (which a codec or a cache might
treat specially). The seed picks the colours and the paths: a different seed, different bytes.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def frame_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height); both even (H.264 in yuv420p halves the colour planes) and 32..4096."""
    match = _SIZE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 640x360")
    width, height = int(match[1]), int(match[2])
    if not (32 <= width <= 4096 and 32 <= height <= 4096) or width % 2 or height % 2:
        raise ValueError(f"{text!r}: both sides need to be even and from 32 to 4096 pixels")
    return width, height


@dataclass(frozen=True)
class ClipSpec:
    seconds: float
    fps: float  # the clip's own frame rate (what it was "recorded" at)
    width: int
    height: int

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.fps))

    @property
    def label(self) -> str:
        return f"{self.seconds:g} s at {self.fps:g} fps, {self.width}x{self.height}"


@dataclass(frozen=True)
class Clip:
    """An encoded clip: the file's bytes and what it shows."""

    data: bytes
    spec: ClipSpec
    mime: str = "video/mp4"


def _background(spec: ClipSpec, rng: random.Random) -> np.ndarray:
    """A diagonal gradient between two seeded colours, ``[height, width, 3]`` uint8."""
    start = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    end = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    blend = ((xs / max(spec.width - 1, 1) + ys / max(spec.height - 1, 1)) / 2)[..., None]
    return (start * (1 - blend) + end * blend).astype(np.uint8)


def _frames(spec: ClipSpec, seed: int):
    """The clip's frames, RGB ``[height, width, 3]`` uint8, one by one."""
    rng = random.Random(seed)
    background = _background(spec, rng)
    side = max(4, min(spec.width, spec.height) // 4)  # the square
    radius = max(2, min(spec.width, spec.height) // 10)  # the ball
    hue = rng.random()
    square_y = rng.randrange(0, max(1, spec.height - side))
    ball_x = rng.randrange(radius, max(radius + 1, spec.width - radius))
    bounce_hz = rng.uniform(0.5, 1.5)
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width]
    bar = max(2, spec.height // 20)
    for index in range(spec.frames):
        progress = index / max(spec.frames - 1, 1)
        frame = background.copy()
        x = round(progress * (spec.width - side))  # left to right over the clip
        frame[square_y : square_y + side, x : x + side] = _colour((hue + progress) % 1.0)
        y = radius + round(abs(math.sin(math.pi * bounce_hz * index / spec.fps)) * (spec.height - 2 * radius - 1))
        frame[(xs - ball_x) ** 2 + (ys - y) ** 2 <= radius**2] = (255, 255, 255)
        frame[spec.height - bar :, : max(1, round(progress * spec.width))] = (0, 0, 0)
        yield frame


def _colour(hue: float) -> tuple[int, int, int]:
    """A saturated colour around the colour wheel (``hue`` in 0..1)."""
    return tuple(round(255 * (0.5 + 0.5 * math.cos(2 * math.pi * (hue - shift)))) for shift in (0, 1 / 3, 2 / 3))


def make_clip(spec: ClipSpec, *, seed: int) -> Clip:
    """``spec`` encoded as H.264 in MP4 (yuv420p: both sides must be even). The same spec and seed give
    the same pictures, and within one process usually the same bytes (no creation time in the file);
    one run encodes its clip once and sends those bytes every time."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=Fraction(spec.fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        # Byte for byte the same every time: x264 on one thread (its threads may split the work
        # differently from run to run), fed frames already in yuv420p (PyAV's conversion inside
        # encode() gave different bytes in a process that had run other work).
        stream.codec_context.thread_count = 1
        for pixels in _frames(spec, seed):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Clip(buffer.getvalue(), spec)
