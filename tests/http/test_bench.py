"""benchmark_vlm.py and its parts: the figures, the ratios, the 7B architecture, the open-loop and
head-of-line workloads, saved runs and their comparison, the SSE reader, and real runs of each."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics

import jsonschema
import pytest

import benchmark_vlm
from bench.engine import start_engine
from bench.hol import hol_summary
from bench.openloop import PlannedRequest, output_lengths, poisson_arrivals, poisson_plan, run_open_loop
from bench.ratios import add_ratios, roofline_tok_s
from bench.report import (
    Report,
    RequestTiming,
    Row,
    format_table,
    latency_percentiles,
    percentile,
    row_from_timings,
)
from bench.runs import Measured, compare_table, run_record
from bench.sse import ChatStreamReader, StreamError
from bench.structured import PairedRequest, answer_problem, paired_free_requests
from bench.workload import build_workload, load_image_option, receipt_schema, receipt_schemas
from snark.engine import random_model
from snark.engine.random_model import published_config
from snark.engine.tiny_model import tiny_config
from snark.structured.constraint import json_grammar
from snark.values import ChatTurn, SamplingParams


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 95) == pytest.approx(95.05)


def test_a_row_reads_ttft_tpot_and_end_to_end_off_the_timings():
    timings = [RequestTiming(0.0, 0.1, 1.1, 11), RequestTiming(0.5, 0.7, 2.7, 11)]
    row = row_from_timings("batched", 2, timings, wall_s=2.0)
    assert row.output_tokens == 22 and row.output_tok_per_s == 11.0 and row.requests_per_s == 1.0
    assert row.ttft_p50_s == pytest.approx(0.15)
    assert row.tpot_p50_s == pytest.approx(0.15)  # (1.0 / 10 + 2.0 / 10) / 2
    assert row.e2e_p95_s == pytest.approx(2.145)  # 1.1 and 2.2 s
    table = format_table([row])
    assert "TTFT p50 ms" in table and "batched" in table and "150" in table


def test_ratios_compare_batched_with_serial_and_the_raw_ceiling():
    report = Report({}, {})
    report.rows = [
        Row("batched", 1, 4, 1.0, 100),
        Row("batched", 16, 32, 1.0, 540),
        Row("serial", 16, 32, 1.0, 100),
        Row("raw generate", 1, 1, 1.0, 105),
        Row("raw generate", 16, 16, 1.0, 600),
        Row("HTTP", 1, 4, 1.0, 90),
        Row("HTTP JSON", 1, 4, 1.0, 98),
    ]
    add_ratios(report, top=16, with_goals=True)
    lines = {ratio.name: ratio for ratio in report.ratios}
    assert lines["batched c=16 vs serial (batch size 1)"].value == pytest.approx(5.4)
    assert lines["batched c=16 vs serial (batch size 1)"].goal == 5.0
    assert lines["batched c=16 vs raw generate at batch 16"].value == pytest.approx(0.9)
    assert "goal >= 95%: MISSED" in lines["HTTP JSON c=1 vs raw generate at batch 1"].line()  # 93% < 95%
    assert lines["HTTP streamed c=1 vs raw generate at batch 1"].goal is None  # reported, no goal
    assert report.rows[1].speedup_vs_serial == pytest.approx(5.4)


def test_ratios_without_goals_and_without_duplicates_at_concurrency_one():
    report = Report({}, {})
    report.rows = [Row("batched", 1, 4, 1.0, 100), Row("raw generate", 1, 1, 1.0, 110)]
    add_ratios(report, top=1, with_goals=False)
    assert [(r.name, r.goal) for r in report.ratios] == [("batched c=1 vs raw generate at batch 1", None)]


def test_the_7b_architecture_is_the_published_one():
    config = published_config("7b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert vision.out_hidden_size == 3584 and vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert vision.window_size == 112 and config.tie_word_embeddings is False
    assert roofline_tok_s(15_231_233_024, 3350) == pytest.approx(220, abs=1)


def test_roofline_only_prints_the_7b_roofline_without_building_weights(capsys):
    assert benchmark_vlm.main(["--roofline-only", "--random-weights", "7B"]) == 0
    out = capsys.readouterr().out
    assert "15.23 GB of bf16 weights" in out and "220 tok/s per stream" in out


def test_random_weights_on_cpu_is_refused_with_a_pointer(capsys):
    assert benchmark_vlm.main(["--random-weights", "7B", "--device", "cpu"]) == 2
    assert "--roofline-only" in capsys.readouterr().err


def test_workload_images_are_seeded_or_read_from_a_file(tmp_path):
    first, label = load_image_option("64x48", seed=3)
    again, _ = load_image_option("64x48", seed=3)
    assert first.size == (64, 48) and label == "64x48 (seeded noise)"
    assert first.tobytes() == again.tobytes()
    first.save(tmp_path / "x.png")
    from_file, label = load_image_option(str(tmp_path / "x.png"), seed=0)
    assert from_file.size == (64, 48) and label == "x.png (64x48)"
    with pytest.raises(SystemExit, match="448x448"):
        load_image_option(str(tmp_path / "missing.jpeg"), seed=0)
    workload = build_workload(3, image_option=None, seed=0)
    assert workload.image is None and len(set(workload.prompts)) == 3


def test_a_small_real_run_in_process_and_over_http(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SNARK_TINY_DIR", tiny_model_dir)
    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "0.9")  # the vLLM engine's variables are ignored
    out = tmp_path / "bench.json"
    argv = [
        "--tiny",
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--max-tokens",
        "3",
        "--compare-serial",
        "--http-check",
    ]
    assert benchmark_vlm.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batched c=2 vs serial (batch size 1)" in printed and "HTTP JSON c=1 vs raw generate at batch 1" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        ("batched", 1),
        ("batched", 2),
        ("serial", 2),
        ("HTTP", 1),
        ("HTTP JSON", 1),
        ("raw generate", 1),
        ("raw generate", 2),
    ]
    for row in rows:  # fixed output lengths everywhere, HTTP included (ignore_eos, usage)
        assert row["output_tokens"] == row["requests"] * 3
    assert rows[3]["note"].endswith("/v1/chat/completions streamed")
    assert rows[4]["note"].endswith("/v1/chat/completions JSON")
    run = json.loads(out.read_text())  # --json is --save: the run record, rows included
    assert run["workload"] == "burst" and run["label"] == "in-process"
    assert run["summary"]["out tok/s at top concurrency"] == rows[1]["output_tok_per_s"]  # batched c=2
    assert [len(r["timings"]) for r in rows] == [2, 2, 2, 2, 2, 0, 0]  # the ceilings time no requests
    assert all(t["output_tokens"] == 3 and t["e2e_s"] > 0 for t in rows[0]["timings"])


def test_a_random_weight_model_is_built_and_served_like_a_loaded_one(tiny_model_dir, monkeypatch):
    # The 7B's path at the tiny model's size (a 7B does not fit this machine): build, then serve.
    monkeypatch.setitem(random_model.PUBLISHED_CONFIGS, "TINY", tiny_config().to_dict())
    loaded = random_model.build_random_model("tiny", processor_dir=tiny_model_dir, device="cpu")
    assert loaded.name == "random-weight Qwen2.5-VL-TINY" and not loaded.is_tiny
    engine = start_engine(lambda: loaded, max_batch_size=2, wait_s=60)

    async def generate():
        prompt = await engine.build_prompt([ChatTurn("user", ["Hi."])], min_pixels=0, max_pixels=0)
        return await engine.run_to_completion(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))

    try:
        done = asyncio.run(generate())
    finally:
        engine.stop()
    assert done.completion_tokens == 3


# --- the open-loop workload ---------------------------------------------------------------------
def test_poisson_arrivals_are_seeded_and_keep_their_mean_rate():
    arrivals = poisson_arrivals(4000, 5.0, seed=7)
    assert arrivals == poisson_arrivals(4000, 5.0, seed=7)  # reproducible
    assert arrivals != poisson_arrivals(4000, 5.0, seed=8)
    assert arrivals[0] == 0.0 and all(b > a for a, b in itertools.pairwise(arrivals))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) / arrivals[-1] == pytest.approx(5.0, rel=0.05)  # 3999 gaps of mean 0.2 s
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.1)  # exponential: stdev = mean


def test_output_lengths_are_a_seeded_uniform_mix_independent_of_the_rate():
    lengths = output_lengths(1000, [16, 32, 256], seed=1)
    assert lengths == output_lengths(1000, [16, 32, 256], seed=1)
    assert set(lengths) == {16, 32, 256} and all(250 < lengths.count(n) < 420 for n in (16, 32, 256))
    slow = poisson_plan(20, rate_per_s=1.0, choices=[16, 256], seed=3)
    fast = poisson_plan(20, rate_per_s=9.0, choices=[16, 256], seed=3)
    assert [p.max_tokens for p in slow] == [p.max_tokens for p in fast]  # the same load, sooner
    assert slow[5].at_s == pytest.approx(9 * fast[5].at_s)


def test_the_open_loop_sends_every_planned_request_with_its_length():
    seen = []

    async def send(index: int, max_tokens: int) -> RequestTiming:
        seen.append((index, max_tokens))
        if index == 1:
            raise RuntimeError("HTTP 503: 64 requests are already waiting")
        return RequestTiming(0.0, 0.1, 0.2, max_tokens, [0.1, 0.15, 0.2], max_tokens=max_tokens)

    plan = [PlannedRequest(0.0, 16), PlannedRequest(0.0, 64), PlannedRequest(0.0, 8)]
    timings, wall_s, lags = asyncio.run(run_open_loop(send, plan))
    assert sorted(seen) == [(0, 16), (1, 64), (2, 8)] and len(lags) == 3 and wall_s > 0
    assert [t.max_tokens for t in timings] == [16, 64, 8]  # in plan order
    assert timings[1].error == "RuntimeError: HTTP 503: 64 requests are already waiting"  # kept, not raised
    assert timings[0].itl_s == pytest.approx([0.05, 0.05])


def test_latency_percentiles_are_named_in_milliseconds():
    assert latency_percentiles("TTFT", [0.1, 0.2, 0.3, 0.4]) == pytest.approx(
        {"TTFT p50 ms": 250.0, "TTFT p95 ms": 385.0, "TTFT p99 ms": 397.0}
    )
    assert latency_percentiles("ITL", []) == {"ITL p50 ms": None, "ITL p95 ms": None, "ITL p99 ms": None}


# --- the head-of-line workload ------------------------------------------------------------------
def test_the_head_of_line_ratio_is_the_short_request_against_its_idle_median():
    idle = [RequestTiming(0.0, 0.01, e2e, 8, max_tokens=8) for e2e in (0.1, 0.3, 0.2)]
    longs = [RequestTiming(1.0, 1.1, 3.0, 512, max_tokens=512), RequestTiming(1.0, 1.1, 1.2, 512, max_tokens=512)]
    short = RequestTiming(1.3, 1.5, 2.3, 8, max_tokens=8)
    summary = hol_summary(idle, longs, short)
    assert summary["idle short e2e ms"] == pytest.approx(200.0)
    assert summary["short e2e under load ms"] == pytest.approx(1000.0)
    assert summary["short e2e under load / idle"] == pytest.approx(5.0)
    assert summary["short TTFT under load / idle"] == pytest.approx(20.0)
    assert summary["long requests running when the short was sent"] == 1  # the other had ended at 1.2 s
    failed = RequestTiming(1.3, None, 1.4, 0, max_tokens=8, error="RuntimeError: HTTP 503")
    assert hol_summary(idle, longs, failed)["short e2e under load / idle"] is None


# --- saved runs and --compare -------------------------------------------------------------------
def saved_run(workload: str, label: str, summary: dict, **settings) -> dict:
    return run_record(
        workload=workload,
        label=label,
        endpoint="http://127.0.0.1:1/v1/chat/completions",
        model="tiny",
        settings=settings,
        machine={},
        measured=Measured(summary, []),
    )


def test_compare_keeps_each_labels_better_round(tmp_path, capsys):
    rounds = {
        "a1.json": saved_run("poisson", "snark", {"TTFT p95 ms": 100.0, "e2e p95 ms": 900.0}, rate=3.0),
        "b1.json": saved_run("poisson", "vllm", {"TTFT p95 ms": 50.0, "e2e p95 ms": 700.0}, rate=3.0),
        "b2.json": saved_run("poisson", "vllm", {"TTFT p95 ms": 70.0, "e2e p95 ms": 600.0}, rate=3.0),
        "a2.json": saved_run("poisson", "snark", {"TTFT p95 ms": 80.0, "e2e p95 ms": 950.0}, rate=3.0),
    }
    paths = []
    for name, record in rounds.items():
        (tmp_path / name).write_text(json.dumps(record))
        paths.append(str(tmp_path / name))
    assert benchmark_vlm.main(["--compare", *paths]) == 0  # loads no model, runs nothing
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| poisson | snark | vllm |"
    assert "| TTFT p95 ms | 80.0 | 50.0 |" in lines and "| e2e p95 ms | 950 | 700 |" in lines
    assert "| --rate | 3.00 | 3.00 |" in lines
    assert lines[2].startswith("| kept round |") and "a2.json (of 2)" in lines[2] and "b1.json (of 2)" in lines[2]
    assert "lower TTFT p95 ms" in lines[-1]


def test_compare_judges_hol_by_the_lower_ratio_and_burst_by_the_higher_throughput():
    hol = [
        ("1", saved_run("hol", "snark", {"short e2e under load / idle": 3.0})),
        ("2", saved_run("hol", "snark", {"short e2e under load / idle": 2.0})),
        ("3", saved_run("hol", "snark", {"short e2e under load / idle": None})),  # a failed round never wins
    ]
    assert "| short e2e under load / idle | 2.00 |" in compare_table(hol)
    burst = [
        ("1", saved_run("burst", "vllm", {"out tok/s at top concurrency": 500.0})),
        ("2", saved_run("burst", "vllm", {"out tok/s at top concurrency": 650.0})),
    ]
    assert "| out tok/s at top concurrency | 650 |" in compare_table(burst)
    with pytest.raises(Exception, match="different workloads"):
        compare_table([*hol, *burst])


def test_compare_refuses_a_file_that_is_not_a_saved_run(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"rows": []}')
    assert benchmark_vlm.main(["--compare", str(tmp_path / "x.json")]) == 2
    assert "not a run saved by --save" in capsys.readouterr().err


# --- the SSE reader -----------------------------------------------------------------------------
def sse(chunk: dict) -> str:
    return "data: " + json.dumps(chunk)


def test_the_stream_reader_times_the_first_content_not_the_role_chunk_and_reads_usage():
    reader = ChatStreamReader()
    lines = [
        sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        "",
        sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        ": keep-alive comment",
        sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
        sse({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]}),
        "data:" + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),  # no space
        sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}),
        "data: [DONE]",
    ]
    for at, line in enumerate(lines):
        reader.feed(line, float(at))
    assert reader.first_content_at == 4.0 and reader.content_times == [4.0, 5.0]
    assert reader.completion_tokens == 5 and reader.done  # usage, not the 2 content chunks
    assert reader.text == "Hello" and reader.usage_prompt_tokens == 9  # the chat workloads send the text back


def test_the_stream_reader_counts_chunks_without_usage_and_raises_mid_stream_errors():
    reader = ChatStreamReader()
    reader.feed(sse({"choices": [{"delta": {"content": "a"}}]}), 1.0)
    reader.feed(sse({"choices": [{"delta": {"content": "b"}}]}), 2.0)
    assert reader.completion_tokens == 2
    with pytest.raises(StreamError, match="overloaded"):
        reader.feed(sse({"error": {"message": "overloaded", "type": "server_error"}}), 3.0)


def test_the_latency_workloads_check_their_settings(capsys):
    with pytest.raises(SystemExit):
        benchmark_vlm.parse_args(["--workload", "poisson"])
    assert "needs --rate" in capsys.readouterr().err
    args = benchmark_vlm.parse_args(["--workload", "poisson", "--rate", "2", "--output-lens", "8,16"])
    assert args.requests == 48 and args.output_lens == [8, 16]
    with pytest.raises(SystemExit):
        benchmark_vlm.parse_args(["--workload", "hol", "--hol-long", "0"])
    assert "positive counts" in capsys.readouterr().err


# --- real runs of the latency workloads --------------------------------------------------------
def test_a_real_poisson_run_over_http(base_url, tmp_path, capsys):
    out = tmp_path / "poisson.json"
    argv = ["--url", base_url, "--workload", "poisson", "--rate", "50", "--requests", "5", "--output-lens", "2,4"]
    assert benchmark_vlm.main([*argv, "--label", "snark", "--save", str(out)]) == 0
    assert "| TTFT p95 ms |" in capsys.readouterr().out
    run = json.loads(out.read_text())
    assert (run["workload"], run["label"], run["endpoint"]) == ("poisson", "snark", f"{base_url}/v1/chat/completions")
    requests, summary = run["requests"], run["summary"]
    assert len(requests) == 5 and all(r["error"] is None for r in requests)
    assert all(r["output_tokens"] == r["max_tokens"] and r["max_tokens"] in (2, 4) for r in requests)  # ignore_eos
    assert all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in requests)
    assert (summary["completed"], summary["failed"], summary["outputs short of max_tokens"]) == (5, 0, 0)
    assert summary["short requests (<= 32 tokens)"] == 5 and summary["short (<= 32 tokens) e2e p95 ms"] > 0
    for name in ("TTFT", "e2e"):
        assert 0 < summary[f"{name} p50 ms"] <= summary[f"{name} p95 ms"] <= summary[f"{name} p99 ms"]
    assert all(len(r["itl_s"]) < r["output_tokens"] for r in requests)  # gaps between the text chunks
    assert {"ITL p50 ms", "ITL p95 ms", "ITL p99 ms", "client send lag max ms"} <= summary.keys()


def test_a_real_head_of_line_run_over_http(base_url, tmp_path):
    out = tmp_path / "hol.json"
    argv = ["--url", base_url, "--workload", "hol", "--hol-long", "2", "--hol-long-tokens", "24", "--image", "56x56"]
    assert benchmark_vlm.main([*argv, "--hol-short-tokens", "3", "--hol-delay-s", "0.01", "--save", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["settings"]["image"] == "56x56 (seeded noise)"  # sent as a data: URI with every request
    roles = [r["role"] for r in run["requests"]]
    assert roles == ["idle short"] * 3 + ["long"] * 2 + ["short under load"]
    assert all(r["output_tokens"] == r["max_tokens"] for r in run["requests"])
    summary = run["summary"]
    assert summary["failed"] == 0 and summary["short e2e under load / idle"] > 0
    assert summary["short TTFT under load / idle"] > 0 and summary["idle short e2e ms"] > 0


def test_a_real_head_of_line_run_in_process(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SNARK_TINY_DIR", tiny_model_dir)
    out = tmp_path / "hol.json"
    argv = ["--tiny", "--workload", "hol", "--hol-long", "2", "--hol-long-tokens", "16", "--hol-short-tokens", "3"]
    assert benchmark_vlm.main([*argv, "--save", str(out)]) == 0
    run = json.loads(out.read_text())
    assert (run["endpoint"], run["label"], run["model"]) == (
        "in-process engine",
        "in-process",
        run["settings"]["model"],
    )
    assert len(run["requests"]) == 6 and run["summary"]["short e2e under load / idle"] > 0


# --- structured outputs (--workload structured) --------------------------------------------------
def test_the_receipt_schemas_are_valid_and_each_compiles_to_a_grammar_of_its_own():
    schemas = receipt_schemas(16, run_tag="a1")
    for schema in schemas:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schemas[0]["properties"]["date"]["pattern"] == r"^\d{4}-\d{2}-\d{2}$"
    assert schemas[0]["properties"]["items"]["maxItems"] == 8
    grammars = {json_grammar(schema) for schema in schemas}
    assert len(grammars) == 16  # no two requests share a compiled grammar
    # Another run's tag is another grammar: a server that cached the last run's compiles anew.
    assert json_grammar(receipt_schema(3, run_tag="b2")) != json_grammar(schemas[3])


def test_free_requests_get_their_constrained_pairs_lengths_past_end_of_turn():
    assert paired_free_requests([12, 40, 7]) == [
        PairedRequest(0, 12, ignore_eos=True),
        PairedRequest(1, 40, ignore_eos=True),
        PairedRequest(2, 7, ignore_eos=True),
    ]
    assert paired_free_requests([]) == []


def test_a_constrained_answer_is_checked_as_json_and_against_its_schema():
    schema = receipt_schema(0)
    answer = {
        "store": "Corner",
        "date": "2024-05-17",
        "currency": "EUR",
        "items": [],
        "total_cents": 1550,
        "paid": True,
        "note": "",
    }
    assert answer_problem(json.dumps(answer), schema, "stop") is None
    assert answer_problem(json.dumps({**answer, "date": "17 May"}), schema, "stop").startswith("schema:")
    assert answer_problem(json.dumps(answer)[:20], schema, "length").startswith("not JSON (cut at max_tokens)")


def test_the_structured_workload_has_its_own_defaults_and_refuses_images():
    args = benchmark_vlm.parse_args(["--tiny", "--workload", "structured"])
    assert (args.levels, args.max_tokens) == ([1, 16], 1024)
    burst = benchmark_vlm.parse_args(["--tiny"])
    assert (burst.levels, burst.max_tokens) == ([1, 4, 16], 256)
    with pytest.raises(SystemExit):
        benchmark_vlm.parse_args(["--tiny", "--workload", "structured", "--image", "sample.jpeg"])


def test_a_real_structured_run_in_process(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SNARK_TINY_DIR", tiny_model_dir)
    out = tmp_path / "structured.json"
    argv = ["--tiny", "--workload", "structured", "--concurrency", "1,2", "--requests", "1", "--save", str(out)]
    assert benchmark_vlm.main(argv) == 0
    printed = capsys.readouterr().out
    assert "json_schema c=1 vs free, same prompts and lengths" in printed and "goal >= 80%" in printed
    assert "Invalid answers" not in printed
    run = json.loads(out.read_text())
    assert run["workload"] == "structured" and run["endpoint"] == "in-process engine"
    rows = run["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        ("json_schema", 1),
        ("free", 1),
        ("json_schema", 2),
        ("free", 2),
    ]
    for constrained, free in (rows[0:2], rows[2:4]):  # the same prompts and the same lengths
        assert [t["output_tokens"] for t in constrained["timings"]] == [t["output_tokens"] for t in free["timings"]]
        assert all(t["output_tokens"] == t["max_tokens"] for t in free["timings"])
    summary = run["summary"]
    assert summary["invalid answers"] == 0 and summary["checked answers"] == 3  # 1 at c=1, 2 at c=2
    assert summary["free answers of unequal length"] == 0 and "compile ms, first schema" in summary
