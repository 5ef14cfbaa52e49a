"""The latency workloads (``poisson``, ``hol``) and the chat workloads (``conversation``,
``image-repeat``, ``video``, ``long-short``) on one server, an in-process engine or any
OpenAI-compatible server over HTTP: only the sender differs, the workload code is the same."""

from __future__ import annotations

import argparse
import asyncio

from bench import hol
from bench.chat import ChatSend, engine_chat_sender, http_chat_sender
from bench.clip import ClipSpec, frame_size
from bench.conversation import measure_image_chats
from bench.engine import Engine
from bench.longshort import measure_long_short
from bench.openloop import measure_poisson
from bench.runners import HttpTarget, Send, engine_sender, http_sender
from bench.runs import Measured
from bench.video import measure_video
from bench.workload import Workload
from snark.video.load import VideoLoader

CHAT_WORKLOADS = ("conversation", "image-repeat", "video", "long-short")  # whole chats, answers sent back


def prompts_needed(args: argparse.Namespace) -> int:
    """The prompts the workload's ``Workload`` needs; for the chat workloads (which build their own
    chats), the most requests they have in flight at once."""
    if args.workload == "poisson":
        return args.requests + 1  # and one for the warm-up
    if args.workload == "long-short":
        return 1 + args.short_requests
    if args.workload == "video":
        return args.levels[0]  # the clients
    if args.workload in CHAT_WORKLOADS:
        return 1
    return hol.prompts_needed(args.hol_long)


def clip_spec(args: argparse.Namespace) -> ClipSpec:
    return ClipSpec(args.video_seconds, args.video_fps, *frame_size(args.video_size))


async def measure_chat(args: argparse.Namespace, send: ChatSend) -> Measured:
    if args.workload == "long-short":
        return await measure_long_short(
            send,
            reuse=args.reuse_inputs,
            long_prompt_tokens=args.long_prompt_tokens,
            long_tokens=args.long_tokens,
            short_requests=args.short_requests,
            short_tokens=args.short_tokens,
            delay_s=args.short_delay_s,
        )
    if args.workload == "video":
        return await measure_video(
            send,
            spec=clip_spec(args),
            sample_fps=args.video_sample_fps,
            seed=args.seed,
            reuse=args.reuse_inputs,
            clients=args.levels[0],
            questions=args.questions,
            max_tokens=args.max_tokens,
            rounds=args.repeats,
        )
    return await measure_image_chats(
        send,
        workload=args.workload,
        image_option=args.image,
        seed=args.seed,
        reuse=args.reuse_inputs,
        count=args.turns if args.workload == "conversation" else args.questions,
        max_tokens=args.max_tokens,
        rounds=args.repeats,
    )


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
    args: argparse.Namespace,
    engine: Engine,
    workload: Workload,
    pixels: tuple[int, int],
    videos: VideoLoader | None = None,
) -> Measured:
    """``videos``: the server's video limits and sampled-clip cache, for the chats that send videos."""

    async def run() -> Measured:
        if args.workload in CHAT_WORKLOADS:
            async with engine_chat_sender(engine, pixels, videos) as chat_send:
                return await measure_chat(args, chat_send)
        async with engine_sender(engine, workload, pixels) as send:
            return await measure(args, send)

    return asyncio.run(run())


def measure_over_http(args: argparse.Namespace, target: HttpTarget, workload: Workload) -> Measured:
    async def run() -> Measured:
        if args.workload in CHAT_WORKLOADS:
            async with http_chat_sender(target) as chat_send:
                return await measure_chat(args, chat_send)
        async with http_sender(target, workload) as send:
            return await measure(args, send)

    return asyncio.run(run())
