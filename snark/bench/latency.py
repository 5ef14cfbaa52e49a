"""The latency workloads (``poisson``, ``hol``) on one server, an in-process engine or any
OpenAI-compatible server over HTTP: only the sender differs, the workload code is the same."""

from __future__ import annotations

import argparse
import asyncio

from snark.bench import hol
from snark.bench.engine import Engine
from snark.bench.openloop import measure_poisson
from snark.bench.runners import HttpTarget, Send, engine_sender, http_sender
from snark.bench.runs import Measured
from snark.bench.workload import Workload


def prompts_needed(args: argparse.Namespace) -> int:
    if args.workload == "poisson":
        return args.requests + 1  # and one for the warm-up
    return hol.prompts_needed(args.hol_long)


async def measure(args: argparse.Namespace, send: Send) -> Measured:
    if args.workload == "poisson":
        return await measure_poisson(
            send, requests=args.requests, rate_per_s=args.rate, output_lens=args.output_lens, seed=args.seed
        )
    return await hol.measure_hol(
        send,
        long_requests=args.hol_long,
        long_tokens=args.hol_long_tokens,
        short_tokens=args.hol_short_tokens,
        delay_s=args.hol_delay_s,
    )


def measure_on_engine(
    args: argparse.Namespace, engine: Engine, workload: Workload, pixels: tuple[int, int]
) -> Measured:
    async def run() -> Measured:
        async with engine_sender(engine, workload, pixels) as send:
            return await measure(args, send)

    return asyncio.run(run())


def measure_over_http(args: argparse.Namespace, target: HttpTarget, workload: Workload) -> Measured:
    async def run() -> Measured:
        async with http_sender(target, workload) as send:
            return await measure(args, send)

    return asyncio.run(run())
