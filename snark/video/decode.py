"""Video file bytes -> the frames the model will see (``Video``), with PyAV (FFmpeg in its wheels).

Only the frames that will be used are decoded: the clip's length and frame rate come from the
container's header, the sampling rules (``sampling.py``) pick the frame times, and the decoder jumps
to the keyframe before a wanted frame instead of decoding everything in between, then converts just
the wanted frames to RGB, scaled by FFmpeg straight to their final size (a 4K frame never exists
here at full size). A frame is the one nearest its target time, so a variable frame rate samples
evenly in time, and ``second_per_grid_t`` comes from the chosen frames' own timestamps.

Hostile files are refused with a 400 or 413 naming the setting: containers outside a short list of
video formats (no playlists or image sequences that would open other files), no video track, absurd
or over-cap dimensions, clips longer than SNARK_MAX_VIDEO_SECONDS, files that end before their
header says, nothing decodable, and decoding that takes longer than SNARK_VIDEO_DECODE_TIMEOUT_S
(checked between frames: one video of one frame repeated for ten hours costs no more than that).
Runs in a worker thread; FFmpeg decodes without holding the GIL.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np

from snark.errors import PayloadTooLarge, VideoError
from snark.video.clip import Video
from snark.video.sampling import FRAME_FACTOR, MAX_ASPECT_RATIO, VideoSampling

# Demuxers a video may come in (FFmpeg's names). Playlists (hls, concat), image sequences and raw
# streams stay out: some open further files, and none is a video file a client sends.
CONTAINERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,ogg,flv,gif"
FORMAT_HINT = "MP4/MOV, WebM/MKV, AVI, MPEG-TS/PS, Ogg, FLV or GIF"
SEEK_WITHOUT_INDEX_S = 2.0  # without a keyframe index, jump only over gaps longer than this
TRUNCATED_SLACK_S = 1.0  # frames may stop this much before the header's end before the file counts as cut


@dataclass(frozen=True)
class DecodeLimits:
    max_seconds: float = 3600.0
    max_source_pixels: int = 8192 * 4320  # one frame as stored (8K)
    decode_timeout_s: float = 60.0


def decode_video(data: bytes, sampling: VideoSampling, limits: DecodeLimits, label: str = "The video") -> Video:
    """Decode the frames ``sampling`` picks from the video file ``data``. CPU work: call it off the loop."""
    if not data:
        raise VideoError(f"{label} is empty; send the video file's bytes.")
    deadline = time.monotonic() + limits.decode_timeout_s
    try:
        container = av.open(io.BytesIO(data), options={"format_whitelist": CONTAINERS})
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise VideoError(
            f"{label} is not a video file this server reads ({FORMAT_HINT}); send one of those.", code="invalid_video"
        ) from exc
    with container:
        try:
            return _sample(container, data, sampling, limits, label, deadline)
        except av.FFmpegError as exc:
            raise VideoError(
                f"{label} is corrupt or truncated ({exc}); send the complete file.", code="invalid_video"
            ) from exc


@dataclass
class _Probe:
    start: float  # the stream's first timestamp, seconds
    duration: float  # seconds
    frames: int  # frames in the whole stream (from the header, or estimated from its rate)
    height: int  # as stored (a phone video's frames may be turned for display: ``frame.rotation``)
    width: int
    keyframes: list[float]  # keyframe times from the container's index (empty: no index)


def _sample(
    container, data: bytes, sampling: VideoSampling, limits: DecodeLimits, label: str, deadline: float
) -> Video:
    if not container.streams.video:
        raise VideoError(f"{label} has no video track (an audio file?); send a video.", code="invalid_video")
    stream = container.streams.video[0]
    probe = _probe(container, stream, limits, label, deadline)
    start = probe.start + min(max(sampling.start_s or 0.0, 0.0), probe.duration)
    end = probe.start + min(max(sampling.end_s if sampling.end_s is not None else probe.duration, 0.0), probe.duration)
    if end <= start:
        raise VideoError(
            f"video_start ({sampling.start_s}) must come before video_end ({sampling.end_s}) and "
            f"inside the video ({probe.duration:.2f} s).",
            code="invalid_video",
        )
    span = end - start
    if span > limits.max_seconds:
        part = "is" if span == probe.duration else "has a part to sample (video_start/video_end) that is"
        raise PayloadTooLarge(
            f"{label} {part} {span:.0f} s long; this server takes videos up to {limits.max_seconds:.0f} s "
            "(SNARK_MAX_VIDEO_SECONDS). Cut the video, or ask about a part of it with video_start/video_end.",
            code="video_too_long",
        )
    in_range = max(1, round(probe.frames * span / probe.duration)) if probe.duration > 0 else probe.frames
    count = sampling.frame_count(in_range, in_range / span if span > 0 else sampling.fps)
    # The frames Qwen's reader would take (evenly spaced indices from the first to the last frame of
    # the range), as times: the first frame's start to the last frame's start.
    last = start + span * (in_range - 1) / in_range
    targets = [start + (last - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]

    def frame_size(height: int, width: int) -> tuple[int, int]:  # as displayed, known from the first frame
        return sampling.frame_size(height, width, count)

    picked = _decode_nearest(container, stream, targets, probe, frame_size, deadline, limits, label)
    frames = np.stack([array for _, array in picked])
    height, width = frames.shape[1:3]
    times = tuple(round(t - probe.start, 6) for t, _ in picked)
    real_span = times[-1] - times[0]
    second_per_grid_t = FRAME_FACTOR * real_span / (count - 1) if real_span > 0 else FRAME_FACTOR / sampling.fps
    key = hashlib.sha256(data)
    key.update(repr((sampling, count, height, width)).encode())
    return Video(frames=frames, timestamps=times, second_per_grid_t=second_per_grid_t, key=key.digest())


def _probe(container, stream, limits: DecodeLimits, label: str, deadline: float) -> _Probe:
    codec = stream.codec_context
    width, height = (int(codec.width or 0), int(codec.height or 0)) if codec is not None else (0, 0)
    if width <= 0 or height <= 0:
        raise VideoError(
            f"{label} has no picture size in its header ({width}x{height}); send a playable video.",
            code="invalid_video",
        )
    if width * height > limits.max_source_pixels:
        raise PayloadTooLarge(
            f"{label} is {width}x{height} = {width * height} pixels a frame; the limit is "
            f"SNARK_MAX_VIDEO_SOURCE_PIXELS ({limits.max_source_pixels}). Send a smaller video.",
            code="video_too_many_pixels",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise VideoError(
            f"{label} is {width}x{height}; the model accepts aspect ratios up to "
            f"{MAX_ASPECT_RATIO}:1. Crop or pad the video.",
            code="invalid_video",
        )
    time_base = stream.time_base
    start = float(stream.start_time * time_base) if stream.start_time is not None and time_base else 0.0
    duration = float(stream.duration * time_base) if stream.duration and time_base else 0.0
    if duration <= 0 and container.duration:
        duration = container.duration / av.time_base
    frames = int(stream.frames or 0)
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if duration <= 0 or (frames <= 0 and rate <= 0):
        duration, frames = _scan(container, stream, start, deadline, limits, label)  # no usable header: count packets
    elif frames <= 0:
        frames = max(1, round(duration * rate))
    keyframes = [float(entry.timestamp * time_base) for entry in _index(stream) if entry.is_keyframe]
    return _Probe(start, duration, frames, height, width, sorted(keyframes))


def _index(stream) -> list:
    try:
        return list(stream.index_entries or [])
    except (AttributeError, av.FFmpegError):
        return []


def _scan(container, stream, start: float, deadline: float, limits: DecodeLimits, label: str) -> tuple[float, int]:
    """Duration and frame count from the packets themselves (no decoding), for files whose header has
    neither; then back to the start for decoding."""
    count, last = 0, start
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            last = max(last, float(packet.pts * packet.time_base) + float((packet.duration or 0) * packet.time_base))
            if last - start > limits.max_seconds:
                break  # long enough to refuse; no need to read on
        if packet.size:
            count += 1
        _check_deadline(deadline, limits, label)
    container.seek(0)
    if count == 0:
        raise VideoError(f"{label} has no video frames; send a video with pictures.", code="invalid_video")
    return max(last - start, 0.0), count


def _check_deadline(deadline: float, limits: DecodeLimits, label: str) -> None:
    if time.monotonic() > deadline:
        raise VideoError(
            f"Decoding {label[0].lower() + label[1:]} took longer than {limits.decode_timeout_s} s "
            "(SNARK_VIDEO_DECODE_TIMEOUT_S). Send a shorter or smaller video, sample fewer frames (fps, "
            "max_frames), or ask the operator to raise SNARK_VIDEO_DECODE_TIMEOUT_S.",
            code="video_decode_timeout",
        )


def _decode_nearest(
    container,
    stream,
    targets: list[float],
    probe: _Probe,
    frame_size: Callable[[int, int], tuple[int, int]],
    deadline: float,
    limits: DecodeLimits,
    label: str,
) -> list[tuple[float, np.ndarray]]:
    """For each target time, the decoded frame nearest it, as (time, RGB array). Every frame gets the
    size ``frame_size`` gives for the first one's displayed height and width."""
    stream.thread_type = "AUTO"
    picked: list[tuple[float, np.ndarray]] = []
    converted: dict[float, np.ndarray] = {}  # a frame picked twice (short clips) is converted once
    size: list[tuple[int, int]] = []  # (height, width) as displayed, once known

    def take(frame_time: float, frame) -> None:
        if frame_time not in converted:
            rotation = _rotation(frame)
            if not size:
                turned = rotation % 180 != 0
                size.append(
                    frame_size(frame.width if turned else frame.height, frame.height if turned else frame.width)
                )
            converted[frame_time] = _rgb(frame, size[0], rotation)
        picked.append((frame_time, converted[frame_time]))

    frames: Iterator | None = None
    previous: tuple[float, object] | None = None
    sought = probe.start  # where the last jump went: never jump there (or before) again
    index = 0
    while index < len(targets):
        target = targets[index]
        position = previous[0] if previous is not None else None
        jump = _jump_to(position, target, probe.keyframes)
        if frames is None or (jump is not None and jump > sought):
            if frames is not None or target > probe.start:
                _seek(container, stream, target)
                sought = jump if jump is not None else target
            frames, previous = _decoded(container, stream), None
        _check_deadline(deadline, limits, label)
        frame = next(frames, None)
        if frame is None:  # the stream ended: the remaining targets take its last frame
            break
        if frame.time is None:
            continue
        frame_time = float(frame.time)
        while index < len(targets) and frame_time >= targets[index]:
            if previous is not None and targets[index] - previous[0] <= frame_time - targets[index]:
                take(*previous)  # the frame before is nearer
            else:
                take(frame_time, frame)
            index += 1
        previous = (frame_time, frame)
    if index < len(targets):
        if previous is None and not picked:
            raise VideoError(
                f"{label} has no frames that could be decoded; send a playable video.", code="invalid_video"
            )
        last_time = previous[0] if previous is not None else picked[-1][0]
        if targets[-1] - last_time > TRUNCATED_SLACK_S:
            raise VideoError(
                f"{label} ends at {last_time - probe.start:.1f} s, before the "
                f"{probe.duration:.1f} s its header gives: the file is cut short. Send the complete file.",
                code="invalid_video",
            )
        while index < len(targets):
            if previous is not None:
                take(*previous)
            else:
                picked.append(picked[-1])
            index += 1
    return picked


def _decoded(container, stream) -> Iterator:
    for packet in container.demux(stream):
        yield from packet.decode()


def _jump_to(position: float | None, target: float, keyframes: list[float]) -> float | None:
    """Where a jump towards ``target`` would land, when it is worth making: the keyframe before the
    target, if it lies past the last decoded frame (decoding on would pass through it anyway);
    without an index, the target itself when the gap is long."""
    if position is None:
        return None
    if keyframes:
        before_target = bisect.bisect_right(keyframes, target) - 1
        if before_target >= 0 and keyframes[before_target] > position + 1e-6:
            return keyframes[before_target]
        return None
    return target if target - position > SEEK_WITHOUT_INDEX_S else None


def _seek(container, stream, target: float) -> None:
    try:
        container.seek(max(0, math.floor(target / stream.time_base)), stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        container.seek(0)


def _rotation(frame) -> int:
    """Degrees counter-clockwise a phone video's frame is turned for display (its display matrix)."""
    try:
        return int(round(float(frame.rotation) / 90)) * 90 % 360
    except (AttributeError, TypeError, ValueError):
        return 0


def _rgb(frame, size: tuple[int, int], rotation: int) -> np.ndarray:
    """The frame as ``[height, width, 3]`` uint8 RGB at ``size`` (as displayed), scaled by FFmpeg."""
    height, width = size
    if rotation % 180:
        height, width = width, height  # scale in the stored orientation, then turn
    array = frame.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray()
    if rotation:
        array = np.ascontiguousarray(np.rot90(array, k=rotation // 90))
    return array
