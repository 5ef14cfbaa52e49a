"""Video sampling follows Qwen's own rules: checked against ``qwen_vl_utils`` (a test-only dependency,
the package Qwen publishes for preparing Qwen2.5-VL's inputs) on many clip shapes."""

from __future__ import annotations

import pytest
from qwen_vl_utils import vision_process as qwen

from snark.video.sampling import PIXEL_FACTOR, VideoCaps, VideoSampling

QWEN_FRAME_MIN = qwen.VIDEO_MIN_TOKEN_NUM * PIXEL_FACTOR**2
QWEN_FRAME_MAX = qwen.VIDEO_MAX_TOKEN_NUM * PIXEL_FACTOR**2


@pytest.mark.parametrize("total_frames", [4, 5, 17, 90, 240, 1799, 30_000])
@pytest.mark.parametrize("video_fps", [8, 23.976, 30, 60])
@pytest.mark.parametrize("fields", [{}, {"fps": 1.0}, {"fps": 0.5, "min_frames": 8}, {"fps": 4.0, "max_frames": 64}])
def test_frame_count_is_qwens(total_frames, video_fps, fields):
    ours = VideoSampling(**fields).frame_count(total_frames, video_fps)
    assert ours == qwen.smart_nframes(dict(fields), total_frames=total_frames, video_fps=video_fps)
    assert ours % 2 == 0 and 2 <= ours <= 768


@pytest.mark.parametrize("nframes", [2, 7, 40])
def test_fixed_frame_count_is_qwens(nframes):
    assert VideoSampling(nframes=nframes).frame_count(300, 30) == qwen.smart_nframes({"nframes": nframes}, 300, 30)


def test_one_frame_video_gives_a_pair():
    assert VideoSampling().frame_count(1, 30) == 2  # the frame twice, as Qwen pads a frame list


@pytest.mark.parametrize(
    ("height", "width"), [(48, 64), (360, 640), (1080, 1920), (2160, 3840), (1920, 1080), (100, 3000)]
)
@pytest.mark.parametrize("frames", [2, 4, 16, 64, 256, 768])
@pytest.mark.parametrize("total_tokens", [16384, 128000 * 0.9])
def test_frame_size_is_qwens(height, width, frames, total_tokens):
    total_pixels = int(total_tokens * PIXEL_FACTOR**2)
    sampling = VideoSampling(min_pixels=QWEN_FRAME_MIN, max_pixels=QWEN_FRAME_MAX, total_pixels=total_pixels)
    share = max(min(QWEN_FRAME_MAX, total_pixels / frames * qwen.FRAME_FACTOR), int(QWEN_FRAME_MIN * 1.05))
    expected = qwen.smart_resize(height, width, factor=PIXEL_FACTOR, min_pixels=QWEN_FRAME_MIN, max_pixels=share)
    assert sampling.frame_size(height, width, frames) == expected


def test_a_clip_costs_at_most_its_token_budget():
    sampling = VideoSampling(total_pixels=1024 * PIXEL_FACTOR**2, min_pixels=4 * PIXEL_FACTOR**2)
    for frames in (4, 16, 64):
        assert sampling.tokens(1080, 1920, frames) <= 1024 * 1.05


def test_requests_lower_the_caps_never_raise_them():
    caps = VideoCaps(fps=2.0, max_frames=64, min_pixels=16 * 784, max_pixels=256 * 784, total_pixels=4096 * 784)
    asked = caps.clamp(fps=8.0, max_frames=500, max_pixels=10**9, total_pixels=10**9, min_pixels=10**9, nframes=300)
    assert (asked.fps, asked.max_frames, asked.nframes) == (8.0, 64, 64)
    assert (asked.max_pixels, asked.total_pixels, asked.min_pixels) == (256 * 784, 4096 * 784, 256 * 784)
    lowered = caps.clamp(max_frames=8, max_pixels=32 * 784, total_pixels=512 * 784)
    assert (lowered.max_frames, lowered.max_pixels, lowered.total_pixels, lowered.min_pixels) == (
        8,
        32 * 784,
        512 * 784,
        16 * 784,
    )
    assert caps.clamp() == caps.default
