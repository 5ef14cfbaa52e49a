"""``--workload structured``: JSON-schema-constrained answers against free ones of the same length.

    warm-up: one free request; then every schema twice (first: compiles its grammar; repeat: cached)
    each round, each concurrency level c:
        constrained  requests i = 0..N-1, prompt i, schema i % c (c different schemas in flight)
        free         the same prompts, max_tokens = each constrained answer's token count, ignore_eos

A random-weight model's constrained answer is as long as its grammar lets it be; pairing the lengths
makes both sides generate the same tokens from the same prompts, so the ratio is the constraint's cost.
Every constrained answer is parsed and validated against its schema (``jsonschema``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from bench.engine import Engine
from bench.report import Ratio, Report, RequestTiming, Row, row_from_timings
from bench.runners import DEFAULT_PIXELS, REQUEST_TIMEOUT_S, HttpTarget, chat_turns, closed_loop, raise_for_status
from bench.runs import Measured, run_record, save_run
from bench.workload import Workload, build_receipt_workload, receipt_schemas
from snark.structured.constraint import json_schema_output
from snark.values import SamplingParams

PROBE_TOKENS = 8  # the warm-up requests' length
GOALS = {1: 0.80, 16: 0.70}  # constrained tok/s over free tok/s, by concurrency
CONSTRAINED, FREE = "json_schema", "free"
NO_JSONSCHEMA = "jsonschema is not installed here: answers were parsed as JSON but not validated against their schemas"


@dataclass(frozen=True)
class Answer:
    prompt_index: int
    text: str
    finish_reason: str
    timing: RequestTiming


@dataclass(frozen=True)
class PairedRequest:
    """A free request paired with a constrained one: its prompt, made to generate as many tokens."""

    prompt_index: int
    max_tokens: int
    ignore_eos: bool = True


def paired_free_requests(constrained_token_counts: Sequence[int]) -> list[PairedRequest]:
    """Request i of the constrained run generated ``constrained_token_counts[i]`` tokens from prompt i:
    the free request on prompt i is asked for exactly that many, past end-of-turn."""
    return [PairedRequest(index, count, ignore_eos=True) for index, count in enumerate(constrained_token_counts)]


def requests_at(args, concurrency: int) -> int:
    return max(args.requests or 4, concurrency)


# --- checking the answers ------------------------------------------------------------------------
def answer_problem(text: str, schema: dict, finish_reason: str) -> str | None:
    """Why a constrained answer is not valid JSON of its schema; None when it is."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        cut = " (cut at max_tokens)" if finish_reason == "length" else ""
        return f"not JSON{cut}: {exc}"
    try:
        import jsonschema
    except ImportError:
        return None
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    return None if error is None else f"schema: {error.message[:160]}"


def jsonschema_available() -> bool:
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    return True


# --- senders: one request, to an in-process engine or over HTTP ---------------------------------
Send = Callable[[int, dict | None, int, bool], Awaitable[Answer]]  # (prompt index, schema, max_tokens, ignore_eos)


@contextlib.asynccontextmanager
async def engine_sender(engine: Engine, workload: Workload) -> AsyncIterator[Send]:
    async def send(index: int, schema: dict | None, max_tokens: int, ignore_eos: bool) -> Answer:
        sent = time.perf_counter()  # from before the prompt and the grammar: a first schema pays its compile
        prompt = await engine.build_prompt(
            chat_turns(workload, index), min_pixels=DEFAULT_PIXELS[0], max_pixels=DEFAULT_PIXELS[1]
        )
        structure = json_schema_output(schema) if schema is not None else None
        params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=ignore_eos, structure=structure)
        params = await engine.prepare(params)
        request = await asyncio.wait_for(engine.run_to_completion(prompt, params), REQUEST_TIMEOUT_S)
        timing = RequestTiming(sent, None, time.perf_counter(), request.completion_tokens, max_tokens=max_tokens)
        return Answer(index, request.text, request.finish_reason.value, timing)

    yield send


@contextlib.asynccontextmanager
async def http_sender(target: HttpTarget, workload: Workload, concurrency: int) -> AsyncIterator[Send]:
    """Whole (not streamed) answers from ``/v1/chat/completions``, as structured-output clients read them."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:

        async def send(index: int, schema: dict | None, max_tokens: int, ignore_eos: bool) -> Answer:
            body = {
                "model": target.model,
                "messages": [{"role": "user", "content": workload.prompts[index]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": ignore_eos,
            }
            if schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "receipt", "schema": schema, "strict": True},
                }
            sent = time.perf_counter()
            reply = await client.post(f"{target.url}/v1/chat/completions", json=body)
            raise_for_status(reply)
            done, data = time.perf_counter(), reply.json()
            choice = data["choices"][0]
            timing = RequestTiming(sent, None, done, data["usage"]["completion_tokens"], max_tokens=max_tokens)
            return Answer(index, choice["message"]["content"] or "", choice["finish_reason"] or "", timing)

        yield send


def run_structured(
    args,
    open_sender: Callable[[Workload], contextlib.AbstractAsyncContextManager[Send]],
    *,
    report: Report,
    endpoint: str,
    model: str,
) -> int:
    """Measure with the sender ``open_sender`` gives, print the table, ratios, notes and any invalid
    answer, and save the run (``--save``)."""
    top = max(args.levels)
    # A tag per run in a property name: a server that cached these schemas in an earlier run compiles again.
    schemas = receipt_schemas(top, run_tag=f"{time.time_ns():x}")
    workload = build_receipt_workload(max(requests_at(args, level) for level in args.levels))

    async def measure() -> StructuredResult:
        async with open_sender(workload) as send:
            return await measure_structured(send, schemas, levels=args.levels, args=args)

    result = asyncio.run(measure())
    report.rows, report.ratios = result.rows, structured_ratios(result)
    report.notes = structured_notes(result, validated=jsonschema_available())
    report.machine["load_average_at_end"] = os.getloadavg()
    print("\n\n".join(part for part in (report.text(), invalid_answers_text(result)) if part))
    if args.save:
        record = run_record(
            workload="structured",
            label=args.label or args.url or "in-process",
            endpoint=endpoint,
            model=model,
            settings=report.settings,
            machine=report.machine,
            measured=Measured(structured_summary(result), []),
            **report.details_json(),
        )
        save_run(args.save, record)
    return 0


# --- the measurement -----------------------------------------------------------------------------
@dataclass
class CompileTime:
    schema_index: int
    first_s: float  # the first request with this schema: compiles its grammar
    repeat_s: float  # the same request again: the grammar comes from the cache

    @property
    def compile_s(self) -> float:
        return self.first_s - self.repeat_s


@dataclass
class StructuredResult:
    rows: list[Row]  # per level: the constrained row and the free row of the median round
    ratios: dict[int, float]  # per level: the median over rounds of constrained / free tok/s
    compile_times: list[CompileTime]
    invalid: list[tuple[int, str, str]]  # (schema index, why, the answer)
    checked_answers: int
    unequal_pairs: int  # free answers whose length differs from their constrained pair's


async def measure_structured(send: Send, schemas: list[dict], *, levels: list[int], args) -> StructuredResult:
    result = StructuredResult([], {}, [], [], 0, 0)

    def check(answers: list[Answer], schema_of: Callable[[int], int]) -> None:
        for answer in answers:
            result.checked_answers += 1
            schema_index = schema_of(answer.prompt_index)
            if (problem := answer_problem(answer.text, schemas[schema_index], answer.finish_reason)) is not None:
                result.invalid.append((schema_index, problem, answer.text))

    await send(0, None, PROBE_TOKENS, True)  # untimed: the first request of a fresh engine pays one-off costs
    for index, schema in enumerate(schemas):  # untimed warm-up pass, which also times each compile
        # Short answers (cut, so not checked): the same request twice differs by the compile alone.
        first = await send(index, schema, PROBE_TOKENS, False)
        repeat = await send(index, schema, PROBE_TOKENS, False)
        result.compile_times.append(CompileTime(index, first.timing.e2e_s, repeat.timing.e2e_s))

    async def run(level: int, send_one: Callable[[int], Awaitable[Answer]], count: int) -> tuple[list[Answer], float]:
        answers, wall = await closed_loop(send_one, requests=count, concurrency=level)  # type: ignore[arg-type]
        return sorted(answers, key=lambda a: a.prompt_index), wall

    rounds: dict[int, list[tuple[Row, Row, float]]] = {level: [] for level in levels}
    for round_index in range(args.repeats):
        for level in levels:
            count = requests_at(args, level)
            constrained, wall = await run(
                level, lambda i, c=level: send(i, schemas[i % c], args.max_tokens, False), count
            )
            check(constrained, lambda i, c=level: i % c)
            plan = paired_free_requests([a.timing.output_tokens for a in constrained])
            free, free_wall = await run(
                level, lambda i, plan=plan: send(i, None, plan[i].max_tokens, plan[i].ignore_eos), count
            )
            result.unequal_pairs += sum(a.timing.output_tokens != p.max_tokens for a, p in zip(free, plan, strict=True))
            schemas_note = f"{level} schema" + "s" * (level > 1)
            rows = (
                row_from_timings(CONSTRAINED, level, [a.timing for a in constrained], wall, note=schemas_note),
                row_from_timings(FREE, level, [a.timing for a in free], free_wall, note="paired lengths, ignore_eos"),
            )
            ratio = rows[0].output_tok_per_s / rows[1].output_tok_per_s
            rounds[level].append((*rows, ratio))
            print(
                f"  round {round_index + 1}: c={level}: json_schema {rows[0].output_tok_per_s:.1f} tok/s, "
                f"free {rows[1].output_tok_per_s:.1f} tok/s ({ratio:.0%})",
                file=sys.stderr,
            )
    for level, runs in rounds.items():
        for side in (0, 1):  # each side's median round by throughput
            result.rows.append(sorted((r[side] for r in runs), key=lambda row: row.output_tok_per_s)[len(runs) // 2])
        result.ratios[level] = statistics.median(r[2] for r in runs)
    return result


# --- what is printed and saved -------------------------------------------------------------------
def structured_ratios(result: StructuredResult) -> list[Ratio]:
    return [
        Ratio(f"json_schema c={level} vs free, same prompts and lengths", value, GOALS.get(level), unit="%")
        for level, value in result.ratios.items()
    ]


def structured_notes(result: StructuredResult, *, validated: bool) -> list[str]:
    compile_ms = [t.compile_s * 1000 for t in result.compile_times]
    others_ms = statistics.median(compile_ms[1:] or compile_ms)
    notes = [
        "each free request has its constrained pair's prompt and max_tokens = that answer's token count, with "
        "ignore_eos: both sides generate the same tokens from the same prompts; answers are whole, not streamed",
        f"grammar compile, one per schema (a first request's time minus its repeat's): first schema "
        f"{compile_ms[0]:.0f} ms (with one-off set-up), the others median {others_ms:.0f} ms, max "
        f"{max(compile_ms):.0f} ms; the timed rounds use cached grammars",
        f"{len(result.invalid)} invalid of {result.checked_answers} constrained answers"
        + ("" if validated else f" ({NO_JSONSCHEMA})"),
    ]
    if result.unequal_pairs:
        notes.append(
            f"{result.unequal_pairs} free answers differ in length from their pair (the server may not honour "
            "ignore_eos): those ratios compare unequal work"
        )
    return notes


def invalid_answers_text(result: StructuredResult) -> str:
    lines = [f"  schema {i}: {why}\n    {text[:300]!r}" for i, why, text in result.invalid]
    return "Invalid answers:\n" + "\n".join(lines) if lines else ""


def structured_summary(result: StructuredResult) -> dict:
    """Flat figures for ``--save``; the headline is the ratio at the highest concurrency."""
    top = max(result.ratios)
    summary: dict[str, float | int | None] = {"json_schema / free at top concurrency": result.ratios[top]}
    for row in result.rows:
        summary[f"{row.mode} c={row.concurrency} out tok/s"] = row.output_tok_per_s
    for level, value in result.ratios.items():
        summary[f"json_schema / free c={level}"] = value
    compile_ms = [t.compile_s * 1000 for t in result.compile_times]
    summary |= {
        "compile ms, first schema": compile_ms[0],
        "compile ms, median of the others": statistics.median(compile_ms[1:] or compile_ms),
        "invalid answers": len(result.invalid),
        "checked answers": result.checked_answers,
        "free answers of unequal length": result.unequal_pairs,
    }
    return summary
