"""Small test videos, made in the test with PyAV (the same FFmpeg that decodes them).

Each frame is one flat colour whose red channel counts the frame (``frame_value(i)``), so a test can
read from a decoded frame which source frame it was, even after scaling and the codec's rounding.
"""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_value(index: int) -> int:
    return (index * 8) % 256


def make_video(
    frames: int = 16,
    *,
    fps: float = 8,
    width: int = 64,
    height: int = 48,
    container: str = "mp4",
    codec: str = "libx264",
    gop: int | None = None,
    times: list[float] | None = None,
    rotation: int = 0,
    audio: bool = False,
    index_first: bool = False,
) -> bytes:
    """An encoded video of ``frames`` flat frames. ``times`` (seconds, one per frame) makes a variable
    frame rate; ``gop`` sets the keyframe interval (frames); ``index_first`` puts an MP4's index
    before its frames (as streaming sites do), so a cut file still opens."""
    if index_first:  # the muxer moves the index in a second pass over a real file
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "video.mp4"
            _encode(
                str(path),
                frames,
                fps,
                width,
                height,
                container,
                codec,
                gop,
                times,
                rotation,
                audio,
                {"movflags": "faststart"},
            )
            return path.read_bytes()
    buffer = io.BytesIO()
    _encode(buffer, frames, fps, width, height, container, codec, gop, times, rotation, audio, {})
    return buffer.getvalue()


def _encode(target, frames, fps, width, height, container, codec, gop, times, rotation, audio, options) -> None:
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(target, "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0"}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for index in range(frames):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[...] = (frame_value(index), 128, 64)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if times is not None:
                frame.pts = round(times[index] * 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _mux_silence(out, sound)


def make_audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        _mux_silence(out, out.add_stream("aac", rate=16000))
    return buffer.getvalue()


def _mux_silence(out, sound) -> None:
    """One second of silence into the audio stream ``sound``."""
    samples = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
    samples.sample_rate = 16000
    for packet in [*sound.encode(samples), *sound.encode()]:
        out.mux(packet)


def source_index(frame: np.ndarray) -> int:
    """Which source frame a decoded frame was (from its red channel)."""
    return round(float(frame[..., 0].mean()) / 8)
