"""benchmark_vlm.py and its parts: the figures, the ratios, the 7B architecture, and one real run."""

from __future__ import annotations

import asyncio
import json

import pytest

import benchmark_vlm
from snark.bench.ratios import add_ratios, roofline_tok_s
from snark.bench.report import Report, RequestTiming, Row, format_table, percentile, row_from_timings
from snark.bench.workload import build_workload, load_image_option
from snark.engine import random_model
from snark.engine.engine import Engine
from snark.engine.random_model import published_config
from snark.engine.request import ChatTurn, SamplingParams
from snark.engine.tiny_model import tiny_config


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
    add_ratios(report, top=16, with_targets=True)
    lines = {ratio.name: ratio for ratio in report.ratios}
    assert lines["batched c=16 vs serial (batch size 1)"].value == pytest.approx(5.4)
    assert lines["batched c=16 vs serial (batch size 1)"].target == 5.0
    assert lines["batched c=16 vs raw generate at batch 16"].value == pytest.approx(0.9)
    assert "MISSED" in lines["HTTP JSON c=1 vs raw generate at batch 1"].line()  # 93% < 95%
    assert lines["HTTP streamed c=1 vs raw generate at batch 1"].target is None  # reported, no target
    assert report.rows[1].speedup_vs_serial == pytest.approx(5.4)


def test_ratios_without_targets_and_without_duplicates_at_concurrency_one():
    report = Report({}, {})
    report.rows = [Row("batched", 1, 4, 1.0, 100), Row("raw generate", 1, 1, 1.0, 110)]
    add_ratios(report, top=1, with_targets=False)
    assert [(r.name, r.target) for r in report.ratios] == [("batched c=1 vs raw generate at batch 1", None)]


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
        ("batched", 1), ("batched", 2), ("serial", 2), ("HTTP", 1), ("HTTP JSON", 1),
        ("raw generate", 1), ("raw generate", 2),
    ]  # fmt: skip
    for row in rows:  # fixed output lengths everywhere, HTTP included (ignore_eos, usage)
        assert row["output_tokens"] == row["requests"] * 3
    assert rows[3]["note"].endswith("/v1/chat/completions streamed")
    assert rows[4]["note"].endswith("/v1/chat/completions JSON")


def test_a_random_weight_model_is_built_and_served_like_a_loaded_one(tiny_model_dir, monkeypatch):
    # The 7B's path at the tiny model's size (a 7B does not fit this machine): build, then serve.
    monkeypatch.setitem(random_model.PUBLISHED_CONFIGS, "TINY", tiny_config().to_dict())
    loaded = random_model.build_random_model("tiny", processor_dir=tiny_model_dir, device="cpu")
    assert loaded.name == "random-weight Qwen2.5-VL-TINY" and not loaded.is_tiny
    engine = Engine(lambda: loaded, max_batch_size=2)
    engine.start()
    try:
        engine.wait_ready(60)
        prompt = engine.prompts.build([ChatTurn("user", ["Hi."])], min_pixels=0, max_pixels=0)
        done = asyncio.run(engine.generate(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True)))
    finally:
        engine.stop()
    assert done.completion_tokens == 3
