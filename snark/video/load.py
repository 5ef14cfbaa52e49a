"""Video references -> ``Video``: an http(s) URL, a ``data:video/...;base64,`` URI, an upload, or
frames the client sampled itself (a list of images, Qwen's and vLLM's shape for pre-sampled video).

URLs go through ``snark.fetch`` (public addresses only, every redirect checked, a streamed byte cap
and one time budget); decoding runs in a worker thread (``asyncio.to_thread``), off the event loop
and off the generation thread, so other requests keep generating meanwhile. A conversation sends
its video again at every turn: ``DecodedVideos`` keeps sampled clips by a digest of the file and
how it was sampled, so a byte-identical video is decoded once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from snark.errors import VideoError
from snark.fetch import Download, data_uri_bytes, fetch, short
from snark.lru import SharedCache
from snark.video.clip import Video
from snark.video.decode import DecodeLimits, decode_video
from snark.video.sampling import FRAME_FACTOR, VideoCaps, VideoSampling

if TYPE_CHECKING:
    from snark.config import Settings

DECODED_CACHE_BYTES = 256 * 1024**2  # sampled frames kept for videos sent again


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 64 * 1024 * 1024
    url_timeout_s: float = 60.0
    max_redirects: int = 3
    allow_private_urls: bool = False
    max_videos_per_request: int = 2
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    caps: VideoCaps = field(default_factory=VideoCaps)

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        return cls(
            max_bytes=settings.max_video_bytes,
            url_timeout_s=settings.video_url_timeout_s,
            max_redirects=settings.image_url_max_redirects,
            allow_private_urls=settings.allow_private_urls,
            max_videos_per_request=settings.max_videos_per_request,
            decode=DecodeLimits(
                max_seconds=settings.max_video_seconds,
                max_source_pixels=settings.max_video_source_pixels,
                decode_timeout_s=settings.video_decode_timeout_s,
            ),
            caps=VideoCaps(
                fps=settings.video_fps,
                max_frames=settings.max_video_frames,
                min_pixels=min(settings.min_video_frame_pixels, settings.max_video_frame_pixels),
                max_pixels=settings.max_video_frame_pixels,
                total_pixels=settings.max_video_tokens * 28 * 28,
            ),
        )

    @property
    def download(self) -> Download:
        return Download(
            noun="video",
            error=VideoError,
            max_bytes=self.max_bytes,
            bytes_setting="SNARK_MAX_VIDEO_BYTES",
            timeout_s=self.url_timeout_s,
            timeout_setting="SNARK_VIDEO_URL_TIMEOUT_S",
            max_redirects=self.max_redirects,
            allow_private_urls=self.allow_private_urls,
            accept="video/*",
        )


class DecodedVideos:
    """Sampled clips by a digest of their file's bytes and their sampling, least recently used out
    first, bounded by the frames' bytes. Thread-safe (videos are decoded in worker threads); the
    clips are shared between requests, so nothing may change them."""

    def __init__(self, max_bytes: int = DECODED_CACHE_BYTES) -> None:
        self._videos: SharedCache[Video] = SharedCache(max_bytes, size_of=lambda video: video.nbytes)

    @property
    def hits(self) -> int:
        return self._videos.hits

    def get(self, key: bytes) -> Video | None:
        return self._videos.get(key)

    def get_or_decode(self, key: bytes, decode: Callable[[], Video]) -> Video:
        """The clip for ``key``, decoded once however many requests bring it at the same time."""
        return self._videos.get_or_make(key, decode)


class VideoLoader:
    """What the routes use: the server's video limits and decoded-clip cache bound to the loaders,
    and images (for frame lists) through the route's image loader."""

    def __init__(self, limits: VideoLimits, *, decoded: DecodedVideos | None = None) -> None:
        self.limits = limits
        self.decoded = decoded if decoded is not None else DecodedVideos()

    @property
    def caps(self) -> VideoCaps:
        return self.limits.caps

    async def url(self, source: str, sampling: VideoSampling) -> Video:
        return await load_video(source, sampling, self.limits, decoded=self.decoded)

    async def upload(self, data: bytes, sampling: VideoSampling, *, filename: str | None = None) -> Video:
        return await decode_video_upload(data, sampling, self.limits, filename=filename, decoded=self.decoded)

    async def frames(self, images: list[Image.Image], sampling: VideoSampling) -> Video:
        return await asyncio.to_thread(frames_to_video, images, sampling, self.limits)


async def load_video(
    source: str, sampling: VideoSampling, limits: VideoLimits, *, decoded: DecodedVideos | None = None
) -> Video:
    """Fetch an http(s) URL or decode a ``data:video/...;base64,`` URI, then sample it."""
    if source[:5].lower() == "data:":  # base64 of tens of megabytes: decoded in the thread too
        return await asyncio.to_thread(
            lambda: _decode_once(
                data_uri_bytes(source, limits.download, "data:video/mp4;base64,AAAAIGZ0eXA..."),
                sampling,
                limits,
                "The data: URI video",
                decoded,
            )
        )
    data = await fetch(source, limits.download)
    return await asyncio.to_thread(_decode_once, data, sampling, limits, f"The video at {short(source)}", decoded)


async def decode_video_upload(
    data: bytes,
    sampling: VideoSampling,
    limits: VideoLimits,
    *,
    filename: str | None = None,
    decoded: DecodedVideos | None = None,
) -> Video:
    """Sample an uploaded file's bytes; ``filename`` only makes error messages clearer."""
    label = f"The uploaded file {short(filename)!r}" if filename else "The uploaded file"
    limits.download.check_byte_count(len(data), label)
    return await asyncio.to_thread(_decode_once, data, sampling, limits, label, decoded)


def frames_to_video(images: list[Image.Image], sampling: VideoSampling, limits: VideoLimits) -> Video:
    """Frames the client sampled itself, as one video: Qwen's rules for a frame list (an odd count
    repeats the last frame; every frame resized alike, from the first frame's size). ``sampling.fps``
    is the rate they were taken at. CPU work: call it off the loop."""
    if not images:
        raise VideoError("A video given as frames needs at least one image.")
    if len(images) > limits.caps.max_frames:
        raise VideoError(
            f"The video has {len(images)} frames; this server takes at most {limits.caps.max_frames} "
            "(SNARK_MAX_VIDEO_FRAMES): send fewer frames.",
            code="video_too_many_frames",
        )
    count = -(-len(images) // FRAME_FACTOR) * FRAME_FACTOR
    height, width = sampling.frame_size(images[0].height, images[0].width, count)
    key = hashlib.sha256(repr((sampling, count, height, width)).encode())
    frames = []
    for image in images:
        key.update(f"{image.mode} {image.size}".encode() + image.tobytes())
        resized = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)
        frames.append(np.asarray(resized.convert("RGB")))
    frames += [frames[-1]] * (count - len(frames))
    step = 1 / sampling.fps
    return Video(
        frames=np.stack(frames),
        timestamps=tuple(i * step for i in range(count)),
        second_per_grid_t=FRAME_FACTOR / sampling.fps,
        key=key.digest(),
    )


def _decode_once(
    data: bytes, sampling: VideoSampling, limits: VideoLimits, label: str, decoded: DecodedVideos | None
) -> Video:
    limits.download.check_byte_count(len(data), label)
    if decoded is None:
        return decode_video(data, sampling, limits.decode, label)
    digest = hashlib.sha256(data)
    digest.update(repr(sampling).encode())
    key = digest.digest()
    return decoded.get_or_decode(key, lambda: decode_video(data, sampling, limits.decode, label))
