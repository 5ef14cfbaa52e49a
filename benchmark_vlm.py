"""Benchmark Snark, or any OpenAI-compatible server, with one client.

Workloads (--workload):
  burst    (default) closed loop: --concurrency clients, each sending its next request as soon as its
           last one ended; output tok/s, TTFT, TPOT and e2e per concurrency level. In-process it can
           also run batch size 1 (--compare-serial) and the raw ``generate`` ceiling on the same
           loaded model.
  poisson  open loop: --requests arrivals at --rate per second (Poisson, seeded by --seed), each asking
           for a length drawn from --output-lens; TTFT, ITL (the gaps between streamed chunks) and
           e2e at p50/p95/p99, and the e2e p95 of the short requests (<= 32 tokens).
  hol      head of line: --hol-long requests of --hol-long-tokens start together, a request of
           --hol-short-tokens follows --hol-delay-s later; its latency over its latency alone on the
           idle server (measured first, median of 3) says how long a newcomer waits behind running work.
  structured  JSON-schema-constrained answers (response_format json_schema; a receipt schema, renamed per
           client so each of --concurrency clients has its own grammar) against free answers to the same
           prompts, each asked for exactly its constrained pair's token count; output tok/s of each, their
           ratio (goals: >= 80% at concurrency 1, >= 70% at 16), each schema's compile time, and every
           answer parsed and validated against its schema (jsonschema).
  conversation  one image (--image, default 1024x768 noise), --turns chat turns (default 6): turn 1 asks
           about it, each later turn re-sends the whole history (image, questions, the model's answers
           as assistant messages) and a new question; TTFT of turn 1 (a new image) and of turns 2+.
  image-repeat  one image, --questions different questions (default 8), each a fresh single-turn chat;
           TTFT of the first and of questions 2+.
  video    one short clip the benchmark makes (--video-seconds 4 at --video-fps 10, --video-size 640x360: a
           moving square, a bouncing ball), sent as a video_url data: URI with --video-sample-fps (default 2) as
           the part's "fps"; --concurrency clients (default 4) each ask --questions different questions
           (default 4), each a fresh single-turn chat that sends the clip again; TTFT of every client's
           first question (a new video) and of questions 2+ (p50, p95), e2e and aggregate output tok/s.
  long-short  one prompt of --long-prompt-tokens (3000) asking for --long-tokens (256), then
           --short-delay-s (0.5) later --short-requests (15) of --short-tokens (64) at once; aggregate
           output tok/s, the short requests' e2e p50/p95 and the long one's TTFT.
           These four give every run (and --repeats round) an image, clip or first lines of its own, so
           a server's caches from earlier runs cannot serve them (--reuse-inputs: the same every time).

Every request sets ignore_eos (constrained answers end where their grammar ends): output lengths are
exact, so servers compare.

    uv run python benchmark_vlm.py --tiny --concurrency 1,4,16 --requests 32 --max-tokens 64 --compare-serial
    uv run python benchmark_vlm.py --tiny --image sample.jpeg --compare-serial --http-check
    uv run python benchmark_vlm.py --tiny --workload poisson --rate 3 --label snark --save snark-1.json
    uv run python benchmark_vlm.py --tiny --workload hol --hol-long-tokens 256
    uv run python benchmark_vlm.py --tiny --workload structured --concurrency 1,16 --repeats 3
    uv run python benchmark_vlm.py --model DIR --workload conversation --turns 6 --max-tokens 64
    uv run python benchmark_vlm.py --url http://localhost:8000 --workload image-repeat --label vllm --save ir-1.json
    uv run python benchmark_vlm.py --url http://localhost:8000 --workload video --label vllm --save video-1.json
    uv run python benchmark_vlm.py --url http://localhost:8000 --workload long-short --label vllm --save ls-1.json
    uv run python benchmark_vlm.py --url http://localhost:8000 --workload poisson --rate 3 \
        --label vllm --save vllm-1.json
    uv run python benchmark_vlm.py --compare snark-1.json vllm-1.json vllm-2.json snark-2.json
    VLM_SIZE=32B uv run python benchmark_vlm.py --max-tokens 600          # the model the server would load
    uv run python benchmark_vlm.py --random-weights 7B --roofline --compare-serial   # GPU

Where the load goes: by default an in-process engine (the server's own engine and loader on one
loaded model). With --url BASE, any OpenAI-compatible server (Snark, vLLM's own server, ...):
POST BASE/v1/chat/completions with stream, stream_options.include_usage, ignore_eos (vLLM's extension,
which Snark also reads), max_tokens and temperature 0, for --model-name or the first model of
GET BASE/v1/models. TTFT runs from sending the request to the first chunk that carries text (the
role-only first chunk does not count); output tokens are the server's usage figure.

Comparing servers: run them one at a time on the same machine, in rounds A, B, B, A, each run with
--label and --save; then --compare FILE.json ... prints one markdown table (a column per label) and,
for each label, keeps its better round: the lower TTFT p95 for poisson, the lower short-request
ratio for hol, the higher output tok/s at the top concurrency for burst, the lower TTFT of the repeat
requests (turns or questions 2+, p50) for conversation, image-repeat and video, the higher aggregate
tok/s for long-short.

Videos and vLLM's server: it takes the same video_url part, but samples frames by its own
--media-io-kwargs (e.g. '{"video": {"fps": 2}}'; it refuses per-request ones unless started with
--trust-request-mm-kwargs) and needs --limit-mm-per-prompt to allow a video. Give it the same fps as
--video-sample-fps; the figures' "prompt tokens, question 1" (each server's own count) shows whether
both saw the clip alike.

Settings come from the environment as for the server (VLM_MODEL/VLM_SIZE, SNARK_*, and SNARK_ENGINE /
VLLM_*: with --engine vllm or a VLLM_* setting, the in-process engine is the server's vLLM engine, so
`VLLM_TP_SIZE=2 VLM_SIZE=32B uv run --extra vllm --no-group pinned python benchmark_vlm.py` measures
vLLM at tensor parallel 2; vLLM's own server is measured with --url). Goals, for the tiny model
on CPU at 16 concurrent requests: batched >= 5x serial, >= 85% of raw generate; HTTP JSON at
concurrency 1 >= 95% of raw generate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from functools import cache
from pathlib import Path

import torch

from bench import options
from bench.burst import cb_rows, engine_measures, http_measures, raw_measures, requests_at, run_rounds
from bench.ceilings import pad_token_id
from bench.engine import Engine, start_engine, start_vllm_engine
from bench.latency import measure_on_engine, measure_over_http, prompts_needed
from bench.models import load, print_roofline_only
from bench.ratios import add_ratios, add_roofline
from bench.report import Report, burst_summary, machine_info
from bench.runners import HttpTarget, chat_turns
from bench.runs import Measured, compare_table, load_run, run_record, save_run
from bench.workload import build_workload
from snark.config import load_settings
from snark.engine.prompt import PromptBuilder
from snark.engine.tiny_model import is_tiny_checkpoint
from snark.errors import ConfigError
from snark.video.load import VideoLimits, VideoLoader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return options.parse_args(argv, description=__doc__)


def engine_for(loaded, settings, args, *, max_batch_size: int, max_in_flight: int) -> Engine:
    """An engine on the loaded model, with the server's settings unless the command line overrides
    them; its queue holds every request the workload can have in flight at once."""
    return start_engine(
        lambda: loaded,
        max_batch_size=max_batch_size,
        batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else settings.batch_wait_ms,
        max_waiting_requests=max(settings.max_waiting_requests, max_in_flight),
        max_prompt_tokens=settings.max_prompt_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_block_size=settings.kv_block_size,
        prefix_caching=settings.prefix_caching,
        encoder_cache_bytes=settings.encoder_cache_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            print(compare_table([(path, load_run(path)) for path in args.compare]))
            return 0
        torch.manual_seed(args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
        settings = load_settings(**({"engine": args.engine} if args.engine else {}))
        if args.roofline_only:
            return print_roofline_only(args, settings)
        if args.workload == "structured":
            return structured_over_http(args) if args.url else structured_in_process(args, settings)
        count = max(requests_at(args, c) for c in args.levels) if args.workload == "burst" else prompts_needed(args)
        workload = build_workload(count, image_option=args.image, seed=args.seed)
        if args.url:
            if args.workload == "burst":
                return burst_over_http(args, workload)
            return latency_over_http(args, workload)
        if settings.engine_name == "vllm":
            return vllm_in_process(args, settings, workload)
        loaded = load(args, settings)
        if args.workload == "burst":
            return burst_in_process(args, settings, loaded, workload)
        return latency_in_process(args, settings, loaded, workload)
    except ConfigError as exc:
        print(f"benchmark_vlm: {exc}", file=sys.stderr)
        return 2


def burst_over_http(args, workload) -> int:
    from snark.engine.tiny_model import build_tokenizer

    report = Report(machine_info(None), {**vars(args), "image": workload.image_label})
    # The tokenizer counts tokens only on a server without the OpenAI route; built if needed.
    measures, model = http_measures(args.url, workload, args, cache(build_tokenizer), args.levels)
    report.rows = run_rounds(measures, args.repeats)
    return finish_burst(report, args, endpoint=args.url, model=model or "-")


def burst_in_process(args, settings, loaded, workload) -> int:
    from snark.app import create_app
    from snark.engine.random_model import decode_weight_bytes
    from snark.serve import serve_in_thread

    top = max(args.levels)
    max_batch = args.max_batch_size or settings.max_batch_size
    report = Report(machine_info(loaded.device), in_process_settings(args, loaded, workload, max_batch))
    pixels = (settings.min_image_pixels, settings.max_image_pixels)

    def start(batch: int) -> Engine:
        return engine_for(loaded, settings, args, max_batch_size=batch, max_in_flight=top)

    engines = {"batched": start(max_batch)}
    if args.compare_serial:  # the same load at batch size 1, on the same model
        engines["serial"] = start(1)
    main_engine = engines["batched"]
    app_settings = settings.model_copy(
        update={"max_new_tokens_limit": max(settings.max_new_tokens_limit, args.max_tokens)}
    )
    server = (
        serve_in_thread(create_app(app_settings, engine=main_engine)) if args.http_check else contextlib.nullcontext()
    )
    try:
        with server as url:
            measures = []
            for label, engine in engines.items():
                levels = [top] if label == "serial" else args.levels
                measures += engine_measures(label, engine, loaded.device, workload, args, pixels, levels)
            if url:
                tokenizer = loaded.processor.tokenizer
                measures += http_measures(url, workload, args, lambda: tokenizer, [1], note="in-process uvicorn, ")[0]
            # The ceilings take the prompts the engine would build, built here without it.
            builder = PromptBuilder(loaded.processor, max_prompt_tokens=settings.max_prompt_tokens)
            prompts = [
                builder.build(chat_turns(workload, i), min_pixels=pixels[0], max_pixels=pixels[1]) for i in range(top)
            ]
            if not args.no_raw:
                measures += raw_measures(loaded, prompts, pad_token_id(loaded), args)
            report.rows = run_rounds(measures, args.repeats)
        if args.cb:
            report.rows += cb_rows(loaded, prompts, pad_token_id(loaded), args, workload)
    finally:
        for engine in engines.values():
            engine.stop()
    # The goals are set for the toy on CPU, not for the other random-weight size.
    toy = args.tiny or is_tiny_checkpoint(Path(args.model or settings.model_id).expanduser())
    add_ratios(report, top=top, with_goals=toy and loaded.device.type == "cpu")
    if args.roofline:
        add_roofline(report, weight_bytes=decode_weight_bytes(loaded.model), bandwidth_gbs=args.bandwidth_gbs, top=top)
    return finish_burst(report, args, endpoint="in-process engine", model=loaded.name)


def vllm_in_process(args, settings, workload) -> int:
    """The server's vLLM engine in this process (--engine vllm, or SNARK_ENGINE / VLLM_*), through the same
    seam as Snark's own engine. Only the engine is measured: the serial engine and the raw ceilings need
    Snark's own engine on weights loaded here, which vLLM's processes hold instead."""
    from snark.engine.tiny_model import ensure_tiny_model
    from snark.engine.vllm.runtime import require_vllm

    require_vllm()  # before building anything
    if args.random_weights or args.compare_serial or args.cb or args.roofline or args.http_check:
        raise ConfigError(
            "With the vLLM engine the benchmark measures the engine alone: leave out --random-weights, "
            "--compare-serial, --cb, --roofline and --http-check (or measure a running server with --url)."
        )
    model = str(ensure_tiny_model(settings.tiny_dir)) if args.tiny else args.model or settings.model_id
    top = max(args.levels) if args.workload == "burst" else prompts_needed(args)
    settings = load_settings(
        engine="vllm",
        vlm_model=model,
        max_waiting_requests=max(settings.max_waiting_requests, top),
        max_new_tokens_limit=max(settings.max_new_tokens_limit, args.max_tokens),
    )
    engine = start_vllm_engine(settings)
    pixels = (settings.min_image_pixels, settings.max_image_pixels)
    shown = {
        **vars(args),
        "engine": "vllm",
        "model": engine.model_name,
        "image": workload.image_label,
        "device": engine.facts.device,
        "max_batch_size": engine.max_batch_size,
    }
    try:
        if args.workload == "burst":
            report = Report(machine_info(None), shown)
            # Memory: this process's RSS only; vLLM's engine and workers are processes of their own.
            report.rows = run_rounds(
                engine_measures("vllm", engine, torch.device("cpu"), workload, args, pixels, args.levels), args.repeats
            )
            return finish_burst(report, args, endpoint="in-process vLLM engine", model=engine.model_name)
        measured = measure_on_engine(args, engine, workload, pixels, VideoLoader(VideoLimits.from_settings(settings)))
    finally:
        engine.stop()
    return finish_latency(
        args, measured, shown, machine_info(None), endpoint="in-process vLLM engine", model=engine.model_name
    )


def structured_over_http(args) -> int:
    from bench.structured import http_sender, run_structured

    target = HttpTarget(args.url, model=args.model_name)
    if not target.openai:
        raise ConfigError(
            f"--workload structured needs /v1/chat/completions, and {target.url}/v1/models lists no models: "
            "give --model-name if the server has the route without the list."
        )
    report = Report(machine_info(None), {**vars(args), "model": target.model})  # the client's machine
    open_sender = lambda workload: http_sender(target, workload, max(args.levels))  # noqa: E731
    endpoint = f"{target.url}/v1/chat/completions"
    return run_structured(args, open_sender, report=report, endpoint=endpoint, model=target.model)


def structured_in_process(args, settings) -> int:
    from bench.structured import engine_sender, run_structured

    if settings.engine_name == "vllm":
        raise ConfigError(
            "--workload structured runs on Snark's own engine in-process; measure vLLM's server with --url."
        )
    loaded = load(args, settings)
    max_batch = args.max_batch_size or settings.max_batch_size
    engine = engine_for(loaded, settings, args, max_batch_size=max_batch, max_in_flight=max(args.levels))
    report = Report(machine_info(loaded.device), in_process_settings(args, loaded, None, max_batch))
    try:
        return run_structured(
            args,
            lambda workload: engine_sender(engine, workload),
            report=report,
            endpoint="in-process engine",
            model=loaded.name,
        )
    finally:
        engine.stop()


def latency_over_http(args, workload) -> int:
    target = HttpTarget(args.url, model=args.model_name)
    if not target.openai:
        raise ConfigError(
            f"--workload {args.workload} speaks /v1/chat/completions, and {target.url}/v1/models lists no models: "
            "give --model-name if the server has the route without the list."
        )
    machine = machine_info(None)  # the client's machine; the server's may differ
    measured = measure_over_http(args, target, workload)
    settings = {**vars(args), "image": workload.image_label}
    return finish_latency(
        args, measured, settings, machine, endpoint=f"{target.url}/v1/chat/completions", model=target.model
    )


def latency_in_process(args, settings, loaded, workload) -> int:
    max_batch = args.max_batch_size or settings.max_batch_size
    engine = engine_for(loaded, settings, args, max_batch_size=max_batch, max_in_flight=prompts_needed(args))
    videos = VideoLoader(VideoLimits.from_settings(settings))  # the server's video limits and clip cache
    try:
        pixels = (settings.min_image_pixels, settings.max_image_pixels)
        measured = measure_on_engine(args, engine, workload, pixels, videos)
    finally:
        engine.stop()
    shown = in_process_settings(args, loaded, workload, max_batch)
    return finish_latency(
        args, measured, shown, machine_info(loaded.device), endpoint="in-process engine", model=loaded.name
    )


def in_process_settings(args, loaded, workload, max_batch: int) -> dict:
    return {
        **vars(args),
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype),
        "attention": loaded.attn_implementation,
        "image": workload.image_label if workload else "none",
        "max_batch_size": max_batch,
    }


def finish_burst(report: Report, args, *, endpoint: str, model: str) -> int:
    report.machine["load_average_at_end"] = os.getloadavg()
    print(report.text())
    if args.save:
        measured = Measured(burst_summary(report.rows), [])  # each row keeps its own requests' timings
        record = run_record(
            workload="burst",
            label=args.label or args.url or "in-process",
            endpoint=endpoint,
            model=model,
            settings=report.settings,
            machine=report.machine,
            measured=measured,
            **report.details_json(),
        )
        save_run(args.save, record)
    return 0


def finish_latency(args, measured: Measured, settings: dict, machine: dict, *, endpoint: str, model: str) -> int:
    machine["load_average_at_end"] = os.getloadavg()
    label = args.label or args.url or "in-process"
    record = run_record(
        workload=args.workload,
        label=label,
        endpoint=endpoint,
        model=model,
        settings=settings,
        machine=machine,
        measured=measured,
    )
    print(compare_table([(args.save or "this run", record)]))
    if args.save:
        save_run(args.save, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
