"""Benchmark Snark: batched vs serial throughput and latency, against the raw ``generate`` ceiling.

    uv run python benchmark_vlm.py --tiny --concurrency 1,4,16 --requests 32 --max-tokens 64 --compare-serial
    uv run python benchmark_vlm.py --tiny --image sample.jpeg --compare-serial --http-check
    VLM_SIZE=32B uv run python benchmark_vlm.py --max-tokens 600          # the model the server would load
    uv run python benchmark_vlm.py --random-weights 7B --compile both --roofline --compare-serial   # GPU
    uv run python benchmark_vlm.py --url http://localhost:8123 --concurrency 1,8  # a running server

In-process runs use the server's own ``Engine`` and loader on one loaded model: every mode (batched,
``--compare-serial``'s batch size 1, compiled, raw ``generate``, transformers' continuous batching)
runs on the same weights, one after the other. Output lengths are fixed (``ignore_eos``) so rows
compare. Settings come from the environment as for the server (``VLM_MODEL``/``VLM_SIZE``,
``SNARK_*``); ``VLLM_*`` variables belong to the vLLM engine (a later issue) and are not read here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from functools import cache

import torch

from snark.bench.models import load, print_roofline_only
from snark.bench.ratios import add_ratios, add_roofline
from snark.bench.report import Report, Row, machine_info, row_from_timings
from snark.bench.runners import (
    HttpTarget,
    chat_turns,
    continuous_batching,
    engine_load,
    http_load,
    local_server,
    peak_memory,
    raw_generate,
    reset_peak_memory,
)
from snark.bench.workload import build_workload
from snark.config import DEFAULT_TINY_DIR, load_settings
from snark.engine.engine import Engine
from snark.engine.request import SamplingParams
from snark.errors import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="hub id or checkpoint folder (default: VLM_MODEL, else VLM_SIZE's hub id)")
    source.add_argument(
        "--tiny",
        action="store_true",
        help=f"the tiny random-weight model (built in SNARK_TINY_DIR, default {DEFAULT_TINY_DIR})",
    )
    source.add_argument(
        "--random-weights", metavar="SIZE", help="a real-size architecture with random weights, no download (7B)"
    )
    source.add_argument("--url", help="benchmark a running server at this base URL instead of an in-process engine")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: SNARK_DEVICE, else auto")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request, fixed (default 256)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts to sweep (default 1,4,16)")
    p.add_argument("--requests", type=int, help="requests per concurrency level (default: 2 x concurrency, at least 4)")
    p.add_argument(
        "--image", help="add one image per request: a file (sample.jpeg), a size (448x448, seeded noise) or none"
    )
    p.add_argument(
        "--compare-serial", action="store_true", help="run the highest-concurrency load again with batch size 1"
    )
    p.add_argument(
        "--compile", choices=("off", "on", "both"), help="SNARK_COMPILE path (CUDA only); default: SNARK_COMPILE"
    )
    p.add_argument("--max-batch-size", type=int, help="default: SNARK_MAX_BATCH_SIZE (16)")
    p.add_argument("--batch-wait-ms", type=float, help="default: SNARK_BATCH_WAIT_MS (10)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw model.generate ceiling")
    p.add_argument("--http-check", action="store_true", help="also run concurrency 1 over HTTP to an in-process server")
    p.add_argument("--cb", action="store_true", help="also time transformers' continuous batching (text only)")
    p.add_argument("--roofline", action="store_true", help="compare decode speed with weight bytes / memory bandwidth")
    p.add_argument(
        "--roofline-only", action="store_true", help="print the roofline of the model's architecture and exit"
    )
    p.add_argument(
        "--bandwidth-gbs", type=float, default=3350.0, help="memory bandwidth, GB/s (default 3350: H100 SXM)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the image noise and torch (default 0)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's own choice)")
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds of every timed load; each row is its median round (default 1)"
    )
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    if not args.levels or min(args.levels) < 1 or args.max_tokens < 1:
        p.error("--concurrency needs positive integers and --max-tokens a positive count")
    return args


def requests_at(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.requests or max(4, 2 * concurrency), concurrency)


Measure = Callable[[], Row]


def run_rounds(measures: list[Measure], repeats: int) -> list[Row]:
    """Every measure once per round, ``repeats`` rounds: a busy neighbour then slows all modes alike
    instead of whichever ran at the time. Each row is its median round by throughput."""
    rounds: list[list[Row]] = [[] for _ in measures]
    for round_index in range(repeats):
        for runs, measure in zip(rounds, measures, strict=True):
            runs.append(measure())
            row = runs[-1]
            print(
                f"  round {round_index + 1}: {row.mode} c={row.concurrency}: {row.output_tok_per_s:.1f} tok/s",
                file=sys.stderr,
            )
    return [sorted(runs, key=lambda r: r.output_tok_per_s)[len(runs) // 2] for runs in rounds]


def engine_measures(label: str, engine: Engine, workload, args, pixels, levels: list[int]) -> list[Measure]:
    """Warm ``engine`` up (untimed), then one measure per concurrency level."""
    warm = SamplingParams(max_new_tokens=min(8, args.max_tokens), ignore_eos=True)
    top = max(levels)
    engine_load(engine, workload, warm, requests=top, concurrency=top, pixels=pixels)
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)

    def measure(concurrency: int) -> Row:
        reset_peak_memory(engine.loaded.device)
        count = requests_at(args, concurrency)
        timings, wall = engine_load(engine, workload, params, requests=count, concurrency=concurrency, pixels=pixels)
        memory, kind = peak_memory(engine.loaded.device)
        return row_from_timings(label, concurrency, timings, wall, peak_memory_bytes=memory, memory_kind=kind)

    return [lambda c=c: measure(c) for c in levels]


def http_measures(
    url: str, workload, args, tokenizer: Callable[[], object], levels: list[int], note: str = ""
) -> list[Measure]:
    """Rows "HTTP" (streamed: SSE or text chunks) and "HTTP JSON" (one reply per request)."""
    count_tokens = lambda text: len(tokenizer()(text)["input_ids"])  # noqa: E731
    targets = {"HTTP": HttpTarget(url, count_tokens=count_tokens), "HTTP JSON": HttpTarget(url, count_tokens=count_tokens, stream=False)}
    for target in targets.values():
        http_load(target, workload, min(8, args.max_tokens), requests=1, concurrency=1)  # untimed warm-up

    def measure(mode: str, concurrency: int) -> Row:
        count = requests_at(args, concurrency)
        timings, wall = http_load(targets[mode], workload, args.max_tokens, requests=count, concurrency=concurrency)
        return row_from_timings(mode, concurrency, timings, wall, note=note + targets[mode].api)

    return [lambda m=m, c=c: measure(m, c) for m in targets for c in levels]


def raw_measures(loaded, prompts, pad_token_id: int, args) -> list[Measure]:
    def measure(batch: int) -> Row:
        reset_peak_memory(loaded.device)
        seconds = raw_generate(loaded, prompts[:batch], max_new_tokens=args.max_tokens, pad_token_id=pad_token_id)
        memory, kind = peak_memory(loaded.device)
        return Row("raw generate", batch, batch, seconds, batch * args.max_tokens, e2e_p50_s=seconds,
                   peak_memory_bytes=memory, memory_kind=kind, note=f"batch {batch}")  # fmt: skip

    batches = sorted({1, len(prompts)})
    for batch in batches:  # untimed warm-up
        raw_generate(loaded, prompts[:batch], max_new_tokens=min(8, args.max_tokens), pad_token_id=pad_token_id)
    return [lambda b=b: measure(b) for b in batches]


def start_engine(loaded, settings, args, *, max_batch_size: int, compile_decode: bool) -> Engine:
    engine = Engine(
        lambda: loaded,
        max_batch_size=max_batch_size,
        batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else settings.batch_wait_ms,
        max_waiting_requests=max(settings.max_waiting_requests, max(args.levels)),
        max_prompt_tokens=settings.max_prompt_tokens,
        compile_decode=compile_decode,
    )
    engine.start()
    engine.wait_ready(None)
    return engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = load_settings()
        if args.roofline_only:
            return print_roofline_only(args, settings)
        workload = build_workload(
            max(requests_at(args, c) for c in args.levels), image_option=args.image, seed=args.seed
        )
        if args.url:
            from snark.engine.tiny_model import build_tokenizer

            report = Report(machine_info(None), {**vars(args), "image": workload.image_label})
            measures = http_measures(
                args.url, workload, args, cache(build_tokenizer), args.levels
            )  # tokenizer: if needed
            report.rows = run_rounds(measures, args.repeats)
            return finish(report, args)
        loaded = load(args, settings)
        return run_in_process(args, settings, loaded, workload)
    except ConfigError as exc:
        print(f"benchmark_vlm: {exc}", file=sys.stderr)
        return 2


def run_in_process(args, settings, loaded, workload) -> int:
    from snark.engine.random_model import decode_weight_bytes
    from snark.server import create_app

    top = max(args.levels)
    compile_mode = args.compile or ("on" if settings.compile else "off")
    max_batch = args.max_batch_size or settings.max_batch_size
    report = Report(
        machine_info(loaded.device),
        {**vars(args), "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype),
         "attention": loaded.attn_implementation, "image": workload.image_label, "max_batch_size": max_batch,
         "compile": compile_mode},
    )  # fmt: skip
    pixels = (settings.min_image_pixels, settings.max_image_pixels)
    engines = {}
    if compile_mode in ("off", "both"):
        engines["batched"] = start_engine(loaded, settings, args, max_batch_size=max_batch, compile_decode=False)
    if compile_mode in ("on", "both"):
        engines["compiled"] = start_engine(loaded, settings, args, max_batch_size=max_batch, compile_decode=True)
    if args.compare_serial:  # the same load at batch size 1, on the same model
        engines["serial"] = start_engine(loaded, settings, args, max_batch_size=1, compile_decode=compile_mode == "on")
    main_engine = next(iter(engines.values()))
    app_settings = settings.model_copy(
        update={"max_new_tokens_limit": max(settings.max_new_tokens_limit, args.max_tokens)}
    )
    server = local_server(create_app(app_settings, engine=main_engine)) if args.http_check else contextlib.nullcontext()
    try:
        with server as url:
            measures = []
            for label, engine in engines.items():
                levels = [top] if label == "serial" else args.levels
                measures += engine_measures(label, engine, workload, args, pixels, levels)
            if url:
                tokenizer = main_engine.loaded.processor.tokenizer
                measures += http_measures(url, workload, args, lambda: tokenizer, [1], note="in-process uvicorn, ")
            bounds = {"min_pixels": pixels[0], "max_pixels": pixels[1]}
            prompts = [main_engine.prompts.build(chat_turns(workload, i), **bounds) for i in range(top)]
            if not args.no_raw:
                measures += raw_measures(loaded, prompts, main_engine.pad_token_id, args)
            report.rows = run_rounds(measures, args.repeats)
        if args.cb:
            report.rows += cb_rows(loaded, prompts, main_engine.pad_token_id, args, workload)
    finally:
        for engine in engines.values():
            engine.stop()
    add_ratios(report, top=top, with_targets=loaded.is_tiny and loaded.device.type == "cpu")
    if args.roofline:
        add_roofline(report, weight_bytes=decode_weight_bytes(loaded.model), bandwidth_gbs=args.bandwidth_gbs, top=top)
    return finish(report, args)


def cb_rows(loaded, prompts, pad_token_id: int, args, workload) -> list[Row]:
    if workload.image is not None:
        return [Row("transformers CB", len(prompts), 0, 1.0, 0, note="skipped: it takes no images")]
    try:
        seconds, tokens = continuous_batching(
            loaded, prompts, max_new_tokens=args.max_tokens, pad_token_id=pad_token_id
        )
    except Exception as exc:  # noqa: BLE001 - an unsupported model is a finding to print, not a crash
        return [Row("transformers CB", len(prompts), 0, 1.0, 0, note=f"failed: {type(exc).__name__}: {exc}"[:200])]
    return [
        Row("transformers CB", len(prompts), len(prompts), seconds, tokens, e2e_p50_s=seconds, note="generate_batch")
    ]


def finish(report: Report, args) -> int:
    report.machine["load_average_at_end"] = os.getloadavg()
    print(report.text())
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
