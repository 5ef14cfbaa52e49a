"""The closed-loop sweep (``--workload burst``): one measure per mode and concurrency level, run in
interleaved rounds; each gives one row of the table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bench.ceilings import continuous_batching, raw_generate
from bench.engine import Engine
from bench.report import Row, row_from_timings
from bench.runners import HttpTarget, engine_load, http_load, peak_memory, reset_peak_memory
from snark.values import SamplingParams


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


def engine_measures(label: str, engine: Engine, device, workload, args, pixels, levels: list[int]) -> list[Measure]:
    """Warm ``engine`` up (untimed), then one measure per concurrency level (``device``: the model's,
    for its peak memory)."""
    warm = SamplingParams(max_new_tokens=min(8, args.max_tokens), ignore_eos=True)
    top = max(levels)
    engine_load(engine, workload, warm, requests=top, concurrency=top, pixels=pixels)
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)

    def measure(concurrency: int) -> Row:
        reset_peak_memory(device)
        count = requests_at(args, concurrency)
        timings, wall = engine_load(engine, workload, params, requests=count, concurrency=concurrency, pixels=pixels)
        memory, kind = peak_memory(device)
        return row_from_timings(label, concurrency, timings, wall, peak_memory_bytes=memory, memory_kind=kind)

    return [lambda c=c: measure(c) for c in levels]


def http_measures(
    url: str, workload, args, tokenizer: Callable[[], object], levels: list[int], note: str = ""
) -> tuple[list[Measure], str | None]:
    """Rows "HTTP" (streamed: SSE or text chunks) and "HTTP JSON" (one reply per request); and the
    model the server was asked for."""
    count_tokens = lambda text: len(tokenizer()(text)["input_ids"])  # noqa: E731
    streamed = HttpTarget(url, count_tokens=count_tokens, model=args.model_name)
    whole = HttpTarget(url, count_tokens=count_tokens, stream=False, model=streamed.model)
    targets = {"HTTP": streamed, "HTTP JSON": whole}
    for target in targets.values():
        http_load(target, workload, min(8, args.max_tokens), requests=1, concurrency=1)  # untimed warm-up

    def measure(mode: str, concurrency: int) -> Row:
        count = requests_at(args, concurrency)
        timings, wall = http_load(targets[mode], workload, args.max_tokens, requests=count, concurrency=concurrency)
        return row_from_timings(mode, concurrency, timings, wall, note=note + targets[mode].api)

    return [lambda m=m, c=c: measure(m, c) for m in targets for c in levels], streamed.model


def raw_measures(loaded, prompts, pad_token_id: int, args) -> list[Measure]:
    def measure(batch: int) -> Row:
        reset_peak_memory(loaded.device)
        seconds = raw_generate(loaded, prompts[:batch], max_new_tokens=args.max_tokens, pad_token_id=pad_token_id)
        memory, kind = peak_memory(loaded.device)
        return Row(
            "raw generate",
            batch,
            batch,
            seconds,
            batch * args.max_tokens,
            e2e_p50_s=seconds,
            peak_memory_bytes=memory,
            memory_kind=kind,
            note=f"batch {batch}",
        )

    batches = sorted({1, len(prompts)})
    for batch in batches:  # untimed warm-up
        raw_generate(loaded, prompts[:batch], max_new_tokens=min(8, args.max_tokens), pad_token_id=pad_token_id)
    return [lambda b=b: measure(b) for b in batches]


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
