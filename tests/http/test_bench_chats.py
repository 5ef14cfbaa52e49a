"""The benchmark's chat workloads (conversation, image-repeat, long-short): what each sends (counted
with a recording sender), their figures, their settings and --compare, and real runs of each against
the in-process engine and over HTTP. No verdict here depends on the machine's speed."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

import benchmark_vlm
from bench.chat import ChatImage, Message, Reply, openai_messages
from bench.conversation import first_and_repeats_summary, question, run_conversation, run_image_repeat
from bench.longshort import long_prompt, run_long_short
from bench.report import RequestTiming
from bench.runs import Measured, compare_table, run_record
from bench.workload import load_image_option, run_image


class RecordingSender:
    """A ``ChatSend`` that keeps every chat it is sent and answers "answer N" (N from 1)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.chats: list[tuple[list[Message], int]] = []
        self.fail_at = fail_at

    async def __call__(self, messages, max_tokens: int) -> Reply:
        self.chats.append((list(messages), max_tokens))
        if len(self.chats) == self.fail_at:
            raise RuntimeError("HTTP 503: overloaded")
        count = len(self.chats)
        timing = RequestTiming(float(count), count + 0.1, count + 0.5, max_tokens, max_tokens=max_tokens)
        return Reply(f"answer {count}", timing, prompt_tokens=10 * count)


def picture() -> ChatImage:
    return ChatImage(load_image_option("56x56", seed=0)[0])


def test_each_turn_resends_the_image_the_questions_and_every_earlier_answer():
    send, image = RecordingSender(), picture()
    replies = asyncio.run(run_conversation(send, image, turns=4, max_tokens=7))
    assert [r.text for r in replies] == ["answer 1", "answer 2", "answer 3", "answer 4"]
    assert len(send.chats) == 4 and all(max_tokens == 7 for _, max_tokens in send.chats)
    for turn, (messages, _) in enumerate(send.chats, start=1):
        assert [m.role for m in messages] == ["user"] + ["assistant", "user"] * (turn - 1)
        assert messages[0].image is image and all(m.image is None for m in messages[1:])  # the image once
        assert [m.text for m in messages if m.role == "assistant"] == [f"answer {k}" for k in range(1, turn)]
        assert [m.text for m in messages if m.role == "user"] == [question(k) for k in range(turn)]
    assert len({question(k) for k in range(20)}) == 20  # always a new question


def test_a_failed_turn_ends_the_conversation_and_is_counted():
    send = RecordingSender(fail_at=2)
    replies = asyncio.run(run_conversation(send, picture(), turns=5, max_tokens=3))
    assert len(send.chats) == 2 and replies[1].timing.error == "RuntimeError: HTTP 503: overloaded"
    summary = first_and_repeats_summary([replies], first="turn 1", repeats="turns 2+", planned=5)
    assert (summary["completed"], summary["failed"], summary["not sent (after a failed turn)"]) == (1, 1, 3)
    assert summary["turns 2+ TTFT p50 ms"] is None and summary["turn 1 TTFT ms"] == pytest.approx(100.0)


def test_image_repeat_asks_different_questions_about_one_image_each_in_a_chat_of_its_own():
    send, image = RecordingSender(), picture()
    replies = asyncio.run(run_image_repeat(send, image, questions=5, max_tokens=3))
    assert len(replies) == 5 and all(len(messages) == 1 for messages, _ in send.chats)
    assert all(messages[0].image is image for messages, _ in send.chats)
    assert len({messages[0].text for messages, _ in send.chats}) == 5
    summary = first_and_repeats_summary([replies], first="question 1", repeats="questions 2+", planned=5)
    assert summary["question 1 TTFT ms"] == pytest.approx(100.0)
    assert summary["questions 2+ TTFT p50 ms"] == pytest.approx(100.0)
    assert summary["questions 2+ TTFT mean ms"] == pytest.approx(100.0)
    assert (summary["prompt tokens, question 1"], summary["prompt tokens, last"]) == (10, 50)


def test_an_image_sent_over_http_is_a_data_uri_part_before_its_text():
    image = picture()
    shaped = openai_messages([Message("user", "What is it?", image), Message("assistant", "A dot.")])
    assert shaped[1] == {"role": "assistant", "content": "A dot."}
    parts = shaped[0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,") and parts[1]["text"] == "What is it?"


def test_each_run_and_round_gets_an_image_of_its_own_unless_told_to_reuse(tmp_path):
    def pixels(option: str, tag: str) -> bytes:
        return run_image(option, seed=0, tag=tag).tobytes()

    assert pixels("64x48", "run1-round-0") == pixels("64x48", "run1-round-0")  # seeded
    assert pixels("64x48", "run1-round-0") != pixels("64x48", "run1-round-1") != pixels("64x48", "run2-round-1")
    assert pixels("64x48", "") == load_image_option("64x48", seed=0)[0].tobytes()  # --reuse-inputs
    load_image_option("64x48", seed=5)[0].save(tmp_path / "x.png")
    plain = load_image_option(str(tmp_path / "x.png"), seed=0)[0]
    tagged = run_image(str(tmp_path / "x.png"), seed=0, tag="run1")
    assert tagged.size == plain.size and tagged.tobytes() != plain.tobytes()
    assert tagged.crop((16, 0, 64, 48)).tobytes() == plain.crop((16, 0, 64, 48)).tobytes()  # only a corner


def test_the_long_prompt_has_about_the_tokens_asked_for(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for tokens in (500, 3000):
        assert len(tokenizer(long_prompt(tokens, "19ab3f00c1d2e3"))["input_ids"]) == pytest.approx(tokens, rel=0.05)
    assert long_prompt(100, "a1") != long_prompt(100, "b2") and long_prompt(100, "").startswith("Read these notes")


def test_long_short_sends_the_long_request_then_all_the_short_ones_after_the_delay():
    send = RecordingSender()
    plan = {"long_prompt_tokens": 300, "long_tokens": 9, "short_requests": 4, "short_tokens": 5, "delay_s": 0.01}
    long, shorts, wall_s = asyncio.run(run_long_short(send, tag="t1", **plan))
    lengths = [max_tokens for _, max_tokens in send.chats]
    assert lengths == [5, 9, 5, 5, 5, 5]  # an untimed warm-up, the long one, then the short ones
    texts = [messages[0].text for messages, _ in send.chats]
    assert all(text.startswith("Run t1") for text in texts) and len(set(texts)) == 6
    assert len(texts[1]) > 10 * len(texts[2]) and long.timing.max_tokens == 9 and len(shorts) == 4
    assert wall_s > 0


def saved_run(workload: str, label: str, summary: dict) -> dict:
    return run_record(
        workload=workload,
        label=label,
        endpoint="http://127.0.0.1:1/v1/chat/completions",
        model="small",
        settings={},
        machine={},
        measured=Measured(summary, []),
    )


def test_compare_keeps_the_lower_repeat_ttft_and_the_higher_aggregate_throughput():
    conversation = [
        ("1", saved_run("conversation", "vllm", {"turn 1 TTFT ms": 900.0, "turns 2+ TTFT p50 ms": 140.0})),
        ("2", saved_run("conversation", "vllm", {"turn 1 TTFT ms": 800.0, "turns 2+ TTFT p50 ms": 120.0})),
    ]
    assert "| turns 2+ TTFT p50 ms | 120 |" in compare_table(conversation)
    repeat = [
        ("1", saved_run("image-repeat", "snark", {"questions 2+ TTFT p50 ms": 50.0})),
        ("2", saved_run("image-repeat", "snark", {"questions 2+ TTFT p50 ms": 70.0})),
    ]
    assert "| questions 2+ TTFT p50 ms | 50.0 |" in compare_table(repeat)
    long_short = [
        ("1", saved_run("long-short", "snark", {"aggregate out tok/s": 90.0})),
        ("2", saved_run("long-short", "snark", {"aggregate out tok/s": 110.0})),
    ]
    assert "| aggregate out tok/s | 110 |" in compare_table(long_short)


def test_the_chat_workloads_have_their_defaults_and_refuse_what_cannot_run(capsys):
    args = benchmark_vlm.parse_args(["--workload", "conversation"])
    assert (args.image, args.turns, args.max_tokens, args.repeats, args.reuse_inputs) == ("1024x768", 6, 256, 1, False)
    args = benchmark_vlm.parse_args(["--workload", "image-repeat", "--image", "sample.jpeg"])
    assert (args.image, args.questions, args.max_tokens) == ("sample.jpeg", 8, 64)
    args = benchmark_vlm.parse_args(["--workload", "long-short"])
    assert (args.long_prompt_tokens, args.long_tokens, args.short_requests, args.short_tokens) == (3000, 256, 15, 64)
    assert args.short_delay_s == 0.5 and args.image is None
    for argv, message in (
        (["--workload", "conversation", "--image", "none"], "about one image"),
        (["--workload", "image-repeat", "--questions", "0"], "positive counts"),
        (["--workload", "long-short", "--image", "sample.jpeg"], "text prompts"),
        (["--workload", "long-short", "--repeats", "2"], "runs once"),
    ):
        with pytest.raises(SystemExit):
            benchmark_vlm.parse_args(argv)
        assert message in capsys.readouterr().err


# --- real runs ------------------------------------------------------------------------------------
def test_a_real_conversation_over_http_sends_the_answers_back(base_url, tmp_path, capsys):
    out = tmp_path / "conversation.json"
    argv = ["--url", base_url, "--workload", "conversation", "--turns", "3", "--max-tokens", "4", "--image", "56x56"]
    assert benchmark_vlm.main([*argv, "--label", "snark", "--save", str(out)]) == 0
    assert "| turns 2+ TTFT p50 ms |" in capsys.readouterr().out
    run = json.loads(out.read_text())
    assert (run["workload"], run["label"], run["endpoint"]) == (
        "conversation",
        "snark",
        f"{base_url}/v1/chat/completions",
    )
    requests = run["requests"]
    assert [(r["round"], r["turn"]) for r in requests] == [(1, 1), (1, 2), (1, 3)]
    assert all(r["error"] is None and r["output_tokens"] == 4 and r["ttft_s"] > 0 for r in requests)
    prompt_tokens = [r["prompt_tokens"] for r in requests]
    assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]  # the history, answers included, grows
    summary = run["summary"]
    assert (summary["completed"], summary["failed"], summary["outputs short of max_tokens"]) == (3, 0, 0)
    for name in (
        "turn 1 TTFT ms",
        "turns 2+ TTFT p50 ms",
        "turns 2+ TTFT mean ms",
        "turn 1 e2e ms",
        "turns 2+ e2e p50 ms",
        "turns 2+ TTFT p50 / turn 1",
    ):
        assert summary[name] > 0, name
    assert summary["prompt tokens, last"] == prompt_tokens[-1]


def test_a_real_conversation_in_process(tiny_model_dir, tmp_path):
    out = tmp_path / "conversation.json"
    argv = ["--model", tiny_model_dir, "--workload", "conversation", "--turns", "3", "--max-tokens", "3"]
    assert benchmark_vlm.main([*argv, "--image", "56x56", "--save", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["endpoint"] == "in-process engine" and len(run["requests"]) == 3
    prompt_tokens = [r["prompt_tokens"] for r in run["requests"]]
    assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]
    assert run["summary"]["turns 2+ TTFT p50 ms"] > 0 and run["summary"]["failed"] == 0


def test_a_real_image_repeat_in_process_has_a_round_per_image(tiny_model_dir, tmp_path):
    out = tmp_path / "repeat.json"
    argv = ["--model", tiny_model_dir, "--workload", "image-repeat", "--questions", "3", "--max-tokens", "2"]
    assert benchmark_vlm.main([*argv, "--image", "56x56", "--repeats", "2", "--save", str(out)]) == 0
    run = json.loads(out.read_text())
    assert [(r["round"], r["question"]) for r in run["requests"]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all(r["output_tokens"] == 2 for r in run["requests"])
    summary = run["summary"]
    assert summary["rounds"] == 2 and summary["completed"] == 6
    assert summary["question 1 TTFT ms"] > 0 and summary["questions 2+ TTFT mean ms"] > 0


def test_a_real_long_short_run_over_http(base_url, tmp_path):
    out = tmp_path / "long-short.json"
    argv = ["--url", base_url, "--workload", "long-short", "--long-prompt-tokens", "200", "--long-tokens", "6"]
    argv += ["--short-requests", "3", "--short-tokens", "2", "--short-delay-s", "0", "--save", str(out)]
    assert benchmark_vlm.main(argv) == 0
    run = json.loads(out.read_text())
    assert [r["role"] for r in run["requests"]] == ["long", "short", "short", "short"]
    assert [r["output_tokens"] for r in run["requests"]] == [6, 2, 2, 2]
    assert run["requests"][0]["prompt_tokens"] > 150
    summary = run["summary"]
    assert (summary["completed"], summary["failed"], summary["outputs short of max_tokens"]) == (4, 0, 0)
    for name in ("aggregate out tok/s", "short e2e p50 ms", "short e2e p95 ms", "long TTFT ms", "long e2e ms"):
        assert summary[name] > 0, name
