"""The benchmark's video workload: the clip it makes, what its clients send (counted with a recording
sender), the request shape, its figures, settings and --compare, and real runs against the in-process
engine and over HTTP. No verdict here depends on the machine's speed."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import numpy as np
import pytest

import benchmark_vlm
from bench.chat import ChatVideo, Message, Reply, openai_messages
from bench.clip import ClipSpec, frame_size, make_clip
from bench.report import RequestTiming
from bench.runs import Measured, compare_table, run_record
from bench.video import measure_video, run_video_round, video_question, video_summary
from snark.api.protocol import ChatCompletionRequest
from snark.video.sampling import VideoSampling

SMALL = ClipSpec(seconds=1, fps=8, width=64, height=48)


def decoded(clip_bytes: bytes) -> tuple[list[np.ndarray], float]:
    with av.open(io.BytesIO(clip_bytes)) as container:
        rate = float(container.streams.video[0].average_rate)
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)], rate


def test_the_clip_is_an_mp4_whose_frames_move_and_whose_seed_picks_the_picture():
    clip = make_clip(SMALL, seed=3)
    frames, rate = decoded(clip.data)
    assert clip.data[4:8] == b"ftyp" and clip.mime == "video/mp4"
    assert len(frames) == SMALL.frames == 8 and rate == pytest.approx(8)
    assert frames[0].shape == (48, 64, 3)
    changes = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:])]
    assert min(changes) > 1  # something moves in every frame, not one picture repeated
    # The seed picks the picture (x264 may encode it with other bytes in another process state)
    again, other = decoded(make_clip(SMALL, seed=3).data)[0], decoded(make_clip(SMALL, seed=4).data)[0]
    assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, again)) < 2
    assert min(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, other)) > 5
    mvhd = clip.data.index(b"mvhd")  # the movie header: version and flags, then its creation time
    assert clip.data[mvhd + 8 : mvhd + 12] == bytes(4)  # none, so the same clip is the same bytes in any second


def test_frame_sizes_are_even_and_in_range():
    assert frame_size("640x360") == (640, 360) and frame_size(" 64X48 ") == (64, 48)
    for bad in ("640", "641x360", "16x16", "8192x32"):
        with pytest.raises(ValueError):
            frame_size(bad)


class RecordingSender:
    """A ``ChatSend`` that keeps every chat, yields once (so the clients interleave, as they would over
    a network), and answers a client's first question in 0.4 s and any later one in 0.1 s."""

    def __init__(self, first_questions: set[str] = frozenset(), fail_at: int | None = None) -> None:
        self.chats: list[tuple[list[Message], int]] = []
        self.first_questions, self.fail_at = first_questions, fail_at

    async def __call__(self, messages, max_tokens: int) -> Reply:
        self.chats.append((list(messages), max_tokens))
        count = len(self.chats)
        await asyncio.sleep(0)
        if count == self.fail_at:
            raise RuntimeError("HTTP 503: overloaded")
        ttft = 0.4 if messages[-1].text in self.first_questions else 0.1
        timing = RequestTiming(float(count), count + ttft, count + 1.0, max_tokens, max_tokens=max_tokens)
        return Reply(f"answer {count}", timing, prompt_tokens=500 + count)


def test_every_client_asks_its_own_questions_about_the_same_clip_all_starting_together():
    video = ChatVideo(make_clip(SMALL, seed=0), 2.0)
    firsts = {video_question(c, 0, 3) for c in range(4)}
    send = RecordingSender(firsts)
    result = asyncio.run(run_video_round(send, video, clients=4, questions=3, max_tokens=5))
    assert len(send.chats) == 12 and all(max_tokens == 5 for _, max_tokens in send.chats)
    assert all(len(messages) == 1 and messages[0].video is video for messages, _ in send.chats)  # each a fresh chat
    assert len({messages[0].text for messages, _ in send.chats}) == 12  # only the clip is shared
    assert {messages[0].text for messages, _ in send.chats[:4]} == firsts  # every client's first, at once
    assert [len(replies) for replies in result.clients] == [3, 3, 3, 3]
    summary = video_summary([result], clip_bytes=2048)
    assert (summary["rounds"], summary["clients"], summary["completed"], summary["failed"]) == (1, 4, 12, 0)
    assert summary["question 1 TTFT p50 ms"] == pytest.approx(400.0)
    assert summary["question 1 TTFT p95 ms"] == pytest.approx(400.0)
    assert summary["questions 2+ TTFT p50 ms"] == pytest.approx(100.0)
    assert summary["questions 2+ TTFT p50 / question 1"] == pytest.approx(0.25)
    assert summary["e2e p95 ms"] == pytest.approx(1000.0) and summary["clip KB"] == 2.0
    assert summary["prompt tokens, question 1"] == 501 and summary["outputs short of max_tokens"] == 0


def test_a_failed_question_is_counted_and_its_client_goes_on():
    send = RecordingSender(fail_at=2)
    result = asyncio.run(
        run_video_round(send, ChatVideo(make_clip(SMALL, seed=0), 2.0), clients=2, questions=3, max_tokens=4)
    )
    assert len(send.chats) == 6
    summary = video_summary([result], clip_bytes=1)
    assert (summary["completed"], summary["failed"]) == (5, 1)


def test_each_run_and_round_gets_a_clip_of_its_own_unless_told_to_reuse():
    def clips(reuse: bool) -> list[bytes]:
        send = RecordingSender()
        measured = asyncio.run(
            measure_video(
                send, spec=SMALL, sample_fps=2.0, seed=7, reuse=reuse, clients=2, questions=1, max_tokens=3, rounds=2
            )
        )
        assert [(r["round"], r["client"], r["question"]) for r in measured.requests] == [
            (1, 1, 1),
            (1, 2, 1),
            (2, 1, 1),
            (2, 2, 1),
        ]
        assert send.chats[0][1] == 3 and measured.summary["rounds"] == 2  # an untimed warm-up first
        return [messages[0].video.clip.data for messages, _ in send.chats]

    warm_up, *timed = clips(reuse=False)
    assert timed[0] == timed[1] != timed[2] == timed[3] and warm_up not in timed
    assert clips(reuse=False)[1] != timed[0]  # another run, another clip
    plain = make_clip(SMALL, seed=7).data
    assert clips(reuse=True) == [plain] * 5


def test_a_video_goes_over_http_as_a_video_url_part_that_snark_reads_with_its_fps():
    clip = make_clip(SMALL, seed=0)
    shaped = openai_messages([Message("user", "What moves?", video=ChatVideo(clip, 3.0))])
    video_part, text_part = shaped[0]["content"]
    assert video_part["type"] == "video_url" and video_part["fps"] == 3.0 and text_part["text"] == "What moves?"
    head, data = video_part["video_url"]["url"].split(",", 1)
    assert head == "data:video/mp4;base64" and base64.b64decode(data) == clip.data
    parsed = ChatCompletionRequest.model_validate({"messages": shaped}).messages[0].content[0]
    assert parsed.fps == 3.0 and parsed.video_url.url.startswith("data:video/mp4;base64,")


def test_the_video_workload_has_its_defaults_and_refuses_what_cannot_run(capsys):
    args = benchmark_vlm.parse_args(["--workload", "video"])
    assert (args.levels, args.questions, args.max_tokens, args.repeats, args.image) == ([4], 4, 64, 1, None)
    assert (args.video_seconds, args.video_fps, args.video_size, args.video_sample_fps) == (4.0, 10.0, "640x360", 2.0)
    assert benchmark_vlm.parse_args(["--workload", "image-repeat"]).questions == 8
    for argv, message in (
        (["--image", "448x448"], "makes its own clip"),
        (["--concurrency", "1,4"], "one --concurrency"),
        (["--video-size", "641x360"], "even"),
        (["--video-sample-fps", "0"], "--video-sample-fps"),
        (["--video-seconds", "0.1"], "two frames"),
        (["--questions", "0"], "positive count"),
    ):
        with pytest.raises(SystemExit):
            benchmark_vlm.parse_args(["--workload", "video", *argv])
        assert message in capsys.readouterr().err


def test_compare_keeps_the_lower_repeat_ttft_and_shows_the_clip_settings():
    def saved(label: str, repeat_ms: float) -> dict:
        settings = {"concurrency": "4", "video_size": "640x360", "video_sample_fps": 2.0}
        return run_record(
            workload="video",
            label=label,
            endpoint="http://127.0.0.1:1/v1/chat/completions",
            model="small",
            settings=settings,
            machine={},
            measured=Measured({"questions 2+ TTFT p50 ms": repeat_ms}, []),
        )

    table = compare_table([("1", saved("snark", 90.0)), ("2", saved("snark", 60.0)), ("3", saved("vllm", 80.0))])
    assert "| questions 2+ TTFT p50 ms | 60.0 | 80.0 |" in table
    assert "| --video-size | 640x360 | 640x360 |" in table and "| --video-sample-fps | 2.00 | 2.00 |" in table


# --- real runs ------------------------------------------------------------------------------------
CLIP_ARGS = ["--workload", "video", "--video-seconds", "2", "--video-fps", "8", "--video-size", "64x48"]


def clip_tokens(sample_fps: float) -> int:
    """The prompt tokens Snark's sampling gives the 2 s, 8 fps, 64x48 clip at ``sample_fps``."""
    sampling = VideoSampling(fps=sample_fps)
    return sampling.tokens(48, 64, sampling.frame_count(16, 8.0))


def test_a_real_video_run_over_http(base_url, tmp_path, capsys):
    out = tmp_path / "video.json"
    argv = ["--url", base_url, *CLIP_ARGS, "--video-sample-fps", "4", "--concurrency", "2", "--questions", "2"]
    assert benchmark_vlm.main([*argv, "--max-tokens", "3", "--label", "snark", "--save", str(out)]) == 0
    assert "| questions 2+ TTFT p50 ms |" in capsys.readouterr().out
    run = json.loads(out.read_text())
    assert (run["workload"], run["label"], run["endpoint"]) == ("video", "snark", f"{base_url}/v1/chat/completions")
    requests = run["requests"]
    assert sorted((r["round"], r["client"], r["question"]) for r in requests) == [
        (1, 1, 1),
        (1, 1, 2),
        (1, 2, 1),
        (1, 2, 2),
    ]
    assert all(r["error"] is None and r["output_tokens"] == 3 and r["ttft_s"] > 0 for r in requests)
    # The part's fps reached the server: 8 frames of the clip (4 a second), twice the default's 4.
    assert clip_tokens(4.0) == 2 * clip_tokens(2.0)
    assert all(clip_tokens(4.0) < r["prompt_tokens"] < clip_tokens(4.0) + 60 for r in requests)
    summary = run["summary"]
    assert (summary["clients"], summary["completed"], summary["failed"], summary["outputs short of max_tokens"]) == (
        2,
        4,
        0,
        0,
    )
    for name in (
        "question 1 TTFT p50 ms",
        "question 1 TTFT p95 ms",
        "questions 2+ TTFT p50 ms",
        "questions 2+ TTFT p95 ms",
        "question 1 e2e p50 ms",
        "e2e p95 ms",
        "aggregate out tok/s",
        "clip KB",
    ):
        assert summary[name] > 0, name


def test_a_real_video_run_in_process_has_a_round_per_clip(tiny_model_dir, tmp_path):
    out = tmp_path / "video.json"
    argv = ["--model", tiny_model_dir, *CLIP_ARGS, "--concurrency", "2", "--questions", "2", "--max-tokens", "2"]
    assert benchmark_vlm.main([*argv, "--repeats", "2", "--save", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["endpoint"] == "in-process engine" and len(run["requests"]) == 8
    assert sorted({(r["round"], r["client"]) for r in run["requests"]}) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["error"] is None and r["output_tokens"] == 2 for r in run["requests"])
    assert all(clip_tokens(2.0) < r["prompt_tokens"] < clip_tokens(2.0) + 60 for r in run["requests"])
    assert run["summary"]["rounds"] == 2 and run["summary"]["questions 2+ TTFT p50 ms"] > 0
