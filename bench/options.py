"""``benchmark_vlm.py``'s command line: every option with its default, grouped by workload, and the
checks that refuse a run that cannot work before anything is loaded."""

from __future__ import annotations

import argparse

from bench.clip import frame_size
from snark.config import DEFAULT_TINY_DIR

WORKLOADS = ("burst", "poisson", "hol", "structured", "conversation", "image-repeat", "video", "long-short")
IMAGE_CHATS = ("conversation", "image-repeat")  # about one image: a new one first, then the same again
POISSON_REQUESTS = 48
MAX_TOKENS, STRUCTURED_MAX_TOKENS, IMAGE_REPEAT_MAX_TOKENS, VIDEO_MAX_TOKENS = 256, 1024, 64, 64
CHAT_IMAGE = "1024x768"  # the image chats' default --image: a screenshot-sized picture
CONCURRENCY, STRUCTURED_CONCURRENCY, VIDEO_CONCURRENCY = "1,4,16", "1,16", "4"
IMAGE_REPEAT_QUESTIONS, VIDEO_QUESTIONS = 8, 4


def parse_args(argv: list[str] | None, *, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    source.add_argument(
        "--url", metavar="BASE", help="measure a running OpenAI-compatible server at this base URL instead"
    )
    p.add_argument("--workload", choices=WORKLOADS, default="burst", help="what load to send (default burst)")
    p.add_argument("--model-name", help="with --url: the model to ask for (default: the first of GET /v1/models)")
    p.add_argument("--label", help="this server's name in --save and --compare (default: the URL, or in-process)")
    p.add_argument(
        "--save", "--json", dest="save", metavar="FILE.json", help="write the run: settings, machine, figures, timings"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="FILE.json",
        help="print saved runs side by side (each label's better round) and exit; nothing is run",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: SNARK_DEVICE, else auto")
    p.add_argument(
        "--requests",
        type=int,
        help=f"burst: requests per concurrency level (default 2 x concurrency, at least 4); "
        f"poisson: requests in all (default {POISSON_REQUESTS}); structured: requests per level and side "
        "(default: the concurrency, at least 4)",
    )
    p.add_argument(
        "--image",
        help="one image per request: a file (sample.jpeg), a size (448x448, seeded noise) or none; "
        f"conversation and image-repeat: the image they are about (default {CHAT_IMAGE})",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the image noise, torch, arrivals and lengths (default 0)")
    p.add_argument(
        "--roofline-only", action="store_true", help="print the roofline of the model's architecture and exit"
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=3350.0,
        help="memory bandwidth for the roofline, GB/s (default 3350: H100 SXM)",
    )

    burst = p.add_argument_group("burst")
    burst.add_argument(
        "--max-tokens",
        type=int,
        help=f"output tokens per request (default {MAX_TOKENS}; image-repeat {IMAGE_REPEAT_MAX_TOKENS}, video "
        f"{VIDEO_MAX_TOKENS}); structured: the most a constrained answer may take (default {STRUCTURED_MAX_TOKENS})",
    )
    burst.add_argument(
        "--concurrency",
        help=f"comma-separated client counts to sweep (default {CONCURRENCY}; structured: {STRUCTURED_CONCURRENCY}); "
        f"video: one count, the clients asking about the clip (default {VIDEO_CONCURRENCY})",
    )
    burst.add_argument(
        "--compare-serial", action="store_true", help="run the highest-concurrency load again with batch size 1"
    )
    burst.add_argument("--no-raw", action="store_true", help="skip the raw model.generate ceiling")
    burst.add_argument(
        "--http-check", action="store_true", help="also run concurrency 1 over HTTP to an in-process server"
    )
    burst.add_argument("--cb", action="store_true", help="also time transformers' continuous batching (text only)")
    burst.add_argument(
        "--roofline", action="store_true", help="compare decode speed with weight bytes / memory bandwidth"
    )
    burst.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every timed load; each row is its median round (default 1); conversation, image-repeat "
        "and video: rounds one after another, each on an image or clip of its own",
    )

    p.add_argument_group(  # a heading in --help: the structured workload uses the general options
        "structured",
        "JSON-schema-constrained answers against free ones of the same lengths, at each --concurrency (one schema "
        "per client: a receipt, renamed per index); uses --requests, --max-tokens and --repeats",
    )

    poisson = p.add_argument_group("poisson")
    poisson.add_argument("--rate", type=float, help="arrivals per second (no default: pick one near the server's pace)")
    poisson.add_argument(
        "--output-lens",
        default="16,32,64,128,256",
        help="max_tokens choices, drawn uniformly (default 16,32,64,128,256)",
    )

    hol = p.add_argument_group("hol")
    hol.add_argument("--hol-long", type=int, default=4, help="long requests started together (default 4)")
    hol.add_argument("--hol-long-tokens", type=int, default=512, help="output tokens per long request (default 512)")
    hol.add_argument("--hol-short-tokens", type=int, default=8, help="output tokens of the short request (default 8)")
    hol.add_argument(
        "--hol-delay-s", type=float, default=0.3, help="seconds between the long requests and the short (default 0.3)"
    )

    chats = p.add_argument_group(
        "conversation, image-repeat, video, long-short",
        "greedy, ignore_eos, streamed; each run (and each round) sends an image, clip or first lines of its own, "
        "so that a server's caches from earlier runs cannot serve them",
    )
    chats.add_argument(
        "--turns", type=int, default=6, help="conversation: turns, each re-sending the history (default 6)"
    )
    chats.add_argument(
        "--questions",
        type=int,
        help=f"image-repeat: questions about the image (default {IMAGE_REPEAT_QUESTIONS}); video: questions each "
        f"client asks about the clip (default {VIDEO_QUESTIONS})",
    )
    chats.add_argument(
        "--long-prompt-tokens", type=int, default=3000, help="long-short: the long prompt's length (default about 3000)"
    )
    chats.add_argument(
        "--long-tokens", type=int, default=256, help="long-short: the long answer's tokens (default 256)"
    )
    chats.add_argument(
        "--short-requests", type=int, default=15, help="long-short: short requests sent at once (default 15)"
    )
    chats.add_argument(
        "--short-tokens", type=int, default=64, help="long-short: each short answer's tokens (default 64)"
    )
    chats.add_argument(
        "--short-delay-s",
        type=float,
        default=0.5,
        help="long-short: seconds from the long request to the short ones (default 0.5)",
    )
    chats.add_argument("--video-seconds", type=float, default=4.0, help="video: the clip's length, seconds (default 4)")
    chats.add_argument("--video-fps", type=float, default=10.0, help="video: the clip's own frame rate (default 10)")
    chats.add_argument(
        "--video-size", default="640x360", help="video: the clip's frame size, WxH, even sides (default 640x360)"
    )
    chats.add_argument(
        "--video-sample-fps",
        type=float,
        default=2.0,
        help="video: the fps sent on the video part, frames a second the server samples (default 2, Qwen's)",
    )
    chats.add_argument(
        "--reuse-inputs",
        action="store_true",
        help="send the plain --image and untagged prompts, the same in every run and round (a warm cache)",
    )

    engine = p.add_argument_group("in-process engine")
    engine.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        help="default: SNARK_ENGINE, or vllm when a VLLM_* setting is given (as for the server)",
    )
    engine.add_argument("--max-batch-size", type=int, help="default: SNARK_MAX_BATCH_SIZE (16)")
    engine.add_argument("--batch-wait-ms", type=float, help="default: SNARK_BATCH_WAIT_MS (0)")
    engine.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's own choice)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def positive_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse the lists and refuse settings that cannot run, before anything is loaded."""
    structured = args.workload == "structured"
    if args.concurrency is None:
        concurrency = {"structured": STRUCTURED_CONCURRENCY, "video": VIDEO_CONCURRENCY}
        args.concurrency = concurrency.get(args.workload, CONCURRENCY)
    if args.max_tokens is None:
        max_tokens = {
            "structured": STRUCTURED_MAX_TOKENS,
            "image-repeat": IMAGE_REPEAT_MAX_TOKENS,
            "video": VIDEO_MAX_TOKENS,
        }
        args.max_tokens = max_tokens.get(args.workload, MAX_TOKENS)
    if args.questions is None:
        args.questions = VIDEO_QUESTIONS if args.workload == "video" else IMAGE_REPEAT_QUESTIONS
    check_chat_args(p, args)
    try:
        args.levels = sorted(set(positive_ints(args.concurrency)))
        args.output_lens = positive_ints(args.output_lens)
    except ValueError:
        p.error("--concurrency and --output-lens take comma-separated integers, such as 1,4,16")
    if not args.levels or min(args.levels) < 1 or args.max_tokens < 1:
        p.error("--concurrency needs positive integers and --max-tokens a positive count")
    if args.requests is not None and args.requests < 1:
        p.error("--requests needs a positive count")
    if args.workload == "poisson":
        args.requests = args.requests or POISSON_REQUESTS
        if args.rate is None or args.rate <= 0:
            p.error("--workload poisson needs --rate, the arrivals per second (such as --rate 3)")
        if not args.output_lens or min(args.output_lens) < 1:
            p.error("--output-lens needs positive token counts, such as 16,32,64,128,256")
    hol_counts = (args.hol_long, args.hol_long_tokens, args.hol_short_tokens)
    if args.workload == "hol" and (min(hol_counts) < 1 or args.hol_delay_s < 0):
        p.error("--hol-long, --hol-long-tokens and --hol-short-tokens need positive counts, --hol-delay-s >= 0")
    if structured and args.image not in (None, "none"):
        p.error("--workload structured sends text prompts (a receipt to extract): leave out --image")
    if args.repeats < 1:
        p.error("--repeats needs a positive count")


def check_chat_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workload in IMAGE_CHATS:
        if args.image is None:
            args.image = CHAT_IMAGE
        if args.image.lower() == "none":
            p.error(f"--workload {args.workload} is about one image: give --image a file or a size ({CHAT_IMAGE})")
        if min(args.turns, args.questions) < 1:
            p.error("--turns and --questions need positive counts")
    if args.workload == "video":
        check_video_args(p, args)
    if args.workload == "long-short":
        if args.image not in (None, "none"):
            p.error("--workload long-short sends text prompts: leave out --image")
        counts = (args.long_prompt_tokens, args.long_tokens, args.short_requests, args.short_tokens)
        if min(counts) < 1 or args.short_delay_s < 0:
            p.error(
                "--long-prompt-tokens, --long-tokens, --short-requests and --short-tokens need positive counts, "
                "--short-delay-s >= 0"
            )
        if args.repeats != 1:
            p.error("--workload long-short runs once: for rounds, run it again with --save and --compare the files")


def check_video_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image not in (None, "none"):
        p.error("--workload video makes its own clip (--video-seconds, --video-fps, --video-size): leave out --image")
    if "," in args.concurrency:
        p.error("--workload video takes one --concurrency, the clients asking about the clip (such as 4)")
    if args.questions < 1:
        p.error("--questions needs a positive count")
    try:
        frame_size(args.video_size)
    except ValueError as exc:
        p.error(f"--video-size {exc}")
    if not 0 < args.video_fps <= 120 or not 0 < args.video_sample_fps <= 60:
        p.error("--video-fps needs a rate from above 0 to 120, --video-sample-fps from above 0 to 60")
    if args.video_seconds <= 0 or round(args.video_seconds * args.video_fps) < 2 or args.video_seconds > 600:
        p.error("--video-seconds needs a length of at least two frames at --video-fps, and at most 600 s")
