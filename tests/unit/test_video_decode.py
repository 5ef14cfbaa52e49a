"""snark.video.decode on real encoded videos (made in the test with PyAV): which frames are taken,
their times, and every kind of bad file refused with a clear error."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from snark.errors import PayloadTooLarge, VideoError
from snark.video.decode import DecodeLimits, decode_video
from snark.video.sampling import VideoSampling
from tests.videos import make_audio_only, make_video, source_index

LIMITS = DecodeLimits()
SMALL = VideoSampling(min_pixels=16 * 784, max_pixels=64 * 784, total_pixels=1024 * 784)


def qwen_indices(total: int, count: int) -> list[int]:
    """The frames Qwen's reader takes: evenly spaced indices, first to last (``torch.linspace().round()``)."""
    return [int(v) for v in np.round(np.linspace(0, total - 1, count))]


@pytest.mark.parametrize(("frames", "fps", "gop"), [(16, 8, None), (120, 30, 12), (95, 24, 48), (60, 30, 1)])
def test_takes_the_frames_qwen_takes(frames, fps, gop):
    video = decode_video(make_video(frames, fps=fps, gop=gop), SMALL, LIMITS)
    count = SMALL.frame_count(frames, fps)
    assert video.num_frames == count
    assert [source_index(f) for f in video.frames] == [i % 32 for i in qwen_indices(frames, count)]
    assert video.timestamps == pytest.approx([i / fps for i in qwen_indices(frames, count)], abs=1e-3)


def test_frames_are_rgb_at_the_sampled_size():
    video = decode_video(make_video(16, width=640, height=360), SMALL, LIMITS)
    assert video.frames.dtype == np.uint8 and video.frames.shape[3] == 3
    assert (video.height, video.width) == SMALL.frame_size(360, 640, video.num_frames)
    assert video.height % 28 == 0 and video.width % 28 == 0


def test_frame_pair_time_comes_from_the_timestamps():
    video = decode_video(make_video(80, fps=20), VideoSampling(fps=1.0), LIMITS)  # 4 s at 1 frame a second
    assert video.num_frames == 4
    spacing = (video.timestamps[-1] - video.timestamps[0]) / 3
    assert video.second_per_grid_t == pytest.approx(2 * spacing)
    assert video.sample_fps == pytest.approx(1 / spacing)


def test_variable_frame_rate_is_sampled_evenly_in_time():
    times = [0.0, 0.05, 0.1, 0.15, 0.2, 2.0, 2.05, 2.1, 3.9, 3.95, 4.0, 6.0]  # bursts and gaps
    video = decode_video(make_video(len(times), times=times), VideoSampling(fps=1.0, min_frames=4), LIMITS)
    # Targets spread over the clip in time; each takes the frame nearest it, whatever its index.
    for frame, taken in zip(video.frames, video.timestamps):
        assert times[source_index(frame)] == pytest.approx(taken, abs=1e-3)
    assert len(set(video.timestamps)) == video.num_frames > 2
    assert video.timestamps[0] == 0.0 and video.timestamps[-1] > 3.5


def test_a_range_of_the_video():
    video = decode_video(make_video(64, fps=8), VideoSampling(fps=2.0, start_s=2.0, end_s=6.0), LIMITS)
    assert 2.0 <= video.timestamps[0] < 2.2 and 5.5 < video.timestamps[-1] <= 6.0
    assert video.num_frames == 8


def test_phone_rotation_is_applied():
    video = decode_video(make_video(8, width=64, height=48, rotation=90), SMALL, LIMITS)
    assert video.height > video.width  # stored landscape, shown portrait


@pytest.mark.parametrize("frames", [1, 3])
def test_very_short_videos_give_a_frame_pair(frames):
    video = decode_video(make_video(frames), SMALL, LIMITS)
    assert video.num_frames == 2


@pytest.mark.parametrize(
    ("container", "codec"),
    [("webm", "libvpx"), ("matroska", "libx264"), ("avi", "mpeg4"), ("mpegts", "libx264"), ("gif", "gif")],
)
def test_other_containers(container, codec):
    video = decode_video(make_video(16, container=container, codec=codec), SMALL, LIMITS)
    assert video.num_frames == 4


def test_a_video_with_sound_reads_its_pictures():
    assert decode_video(make_video(16, audio=True), SMALL, LIMITS).num_frames == 4


def test_same_bytes_and_sampling_same_key():
    data = make_video(16)
    assert decode_video(data, SMALL, LIMITS).key == decode_video(data, SMALL, LIMITS).key
    assert decode_video(data, SMALL, LIMITS).key != decode_video(data, VideoSampling(), LIMITS).key
    assert decode_video(data, SMALL, LIMITS).key != decode_video(make_video(16, fps=4), SMALL, LIMITS).key


# --- bad files ---------------------------------------------------------------------------------

PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "is empty"),
        (b"hello, not a video", "is not a video file"),
        (PLAYLIST, "is not a video file"),  # a playlist would open other files: not among the formats read
        (PNG, "is not a video file"),
        (make_audio_only(), "has no video track"),
        (make_video(0, audio=True), "has no video track"),  # zero frames: the muxer writes no video track
        (make_video(48, fps=8)[:1200], "is not a video file"),  # cut before its index
        (make_video(48, fps=8, index_first=True)[:2500], "ends at"),  # cut mid-stream: its index says longer
    ],
)
def test_bad_files_are_400(data, fragment):
    with pytest.raises(VideoError) as info:
        decode_video(data, SMALL, LIMITS)
    assert info.value.status_code == 400 and fragment in info.value.message


def test_ten_hours_of_one_frame_is_refused_by_length():
    data = make_video(2, times=[0.0, 36000.0])  # a 1.6 KB file that claims ten hours
    with pytest.raises(PayloadTooLarge) as info:
        decode_video(data, SMALL, LIMITS)
    assert info.value.code == "video_too_long" and "SNARK_MAX_VIDEO_SECONDS" in info.value.message
    part = decode_video(data, VideoSampling(start_s=0.0, end_s=60.0), LIMITS)  # a minute of it is fine
    assert part.num_frames == 2


def test_frame_size_over_the_source_cap_is_413():
    with pytest.raises(PayloadTooLarge) as info:
        decode_video(make_video(4, width=320, height=240), SMALL, DecodeLimits(max_source_pixels=320 * 239))
    assert info.value.code == "video_too_many_pixels" and "SNARK_MAX_VIDEO_SOURCE_PIXELS" in info.value.message


def test_absurd_aspect_ratio_is_refused():
    with pytest.raises(VideoError, match="aspect ratio"):
        decode_video(make_video(4, width=4096, height=16), SMALL, LIMITS)


def test_decoding_past_its_time_budget_stops():
    with pytest.raises(VideoError) as info:
        decode_video(make_video(16), SMALL, DecodeLimits(decode_timeout_s=1e-9))
    assert info.value.code == "video_decode_timeout" and "SNARK_VIDEO_DECODE_TIMEOUT_S" in info.value.message


def test_range_outside_the_video_is_refused():
    with pytest.raises(VideoError, match="video_start"):
        decode_video(make_video(16, fps=8), VideoSampling(start_s=5.0, end_s=9.0), LIMITS)


@pytest.mark.parametrize("container", ["mp4", "webm", "mpegts", "avi"])
def test_damaged_files_decode_or_are_refused_never_crash(container):
    codec = {"webm": "libvpx", "avi": "mpeg4"}.get(container, "libx264")
    data = make_video(24, container=container, codec=codec, index_first=container == "mp4")
    rng = np.random.default_rng(7)
    damaged = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 40))]
    for _ in range(40):  # bytes overwritten with noise somewhere in the file
        copy = bytearray(data)
        at = int(rng.integers(0, len(copy) - 16))
        copy[at : at + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        damaged.append(bytes(copy))
    for sample in damaged:
        try:
            video = decode_video(sample, SMALL, LIMITS)
        except (VideoError, PayloadTooLarge):
            continue
        assert video.num_frames % 2 == 0 and video.frames.dtype == np.uint8
