"""``snark serve`` and ``snark tiny-model DIR``."""

from __future__ import annotations

import argparse
import logging
import sys

from snark.config import DEFAULT_TINY_DIR, VLM_SIZES
from snark.engine.tiny_model import SIZES
from snark.errors import ConfigError

log = logging.getLogger("snark.cli")


_FLAGS = {"host": "--host", "port": "--port", "vlm_size": "--size", "vlm_model": "--model"}  # setting -> flag


def _serve(args: argparse.Namespace) -> int:
    from snark.config import load_settings
    from snark.serve import bind_listener

    given = {name: flag for name, flag in _FLAGS.items() if getattr(args, flag[2:]) is not None}
    overrides = {name: getattr(args, flag[2:]) for name, flag in given.items()}
    settings = load_settings(sources=given, **overrides)  # bad settings fail here, before the slow imports below
    listener = bind_listener(settings.host, settings.port)  # a taken port fails now, before any model work

    from snark.serve import serve

    return serve(settings, listener, tiny=args.tiny)


def _tiny_model(args: argparse.Namespace) -> int:
    from snark.engine.tiny_model import write_tiny_model
    from snark.progress import route_transformers_progress

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    route_transformers_progress()
    path = write_tiny_model(args.dir, size=args.size)
    print(f"Wrote a {args.size} random-weight Qwen2.5-VL to {path}. Serve it with: VLM_MODEL={path} snark serve")
    return 0


SETTINGS_POINTER = (
    "Every setting is an environment variable (SNARK_*, VLM_*), validated at start-up; flags win over the "
    "environment. The full list with defaults is the Settings table in docs/configuration.md."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snark",
        description="Serve Qwen2.5-VL over HTTP: form endpoints, an OpenAI-compatible API, metrics and spoken replies.",
        epilog="Try it offline: snark serve --tiny. " + SETTINGS_POINTER,
    )
    parser.add_argument("--version", action="version", version=f"snark {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the server (settings come from SNARK_* env, flags win)",
        description="Start the HTTP server: it listens at once (GET /health answers 503 while the model loads, "
        "then 200). SIGTERM or Ctrl-C stops it: running requests get SNARK_SHUTDOWN_GRACE_S to finish, "
        "then are cancelled; a second signal stops at once.",
        epilog=SETTINGS_POINTER,
    )
    serve.add_argument("--host", help="bind address (env SNARK_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env SNARK_PORT, default 8123)")
    serve.add_argument("--size", help=f"model size: {', '.join(VLM_SIZES)} (env VLM_SIZE, default 7B)")
    serve.add_argument("--model", help="hub id or local folder (env VLM_MODEL; wins over --size)")
    serve.add_argument(
        "--tiny",
        action="store_true",
        help=f"build (or reuse) a tiny random-weight model in SNARK_TINY_DIR (default {DEFAULT_TINY_DIR}) and serve it",
    )
    serve.set_defaults(run=_serve)
    tiny = commands.add_parser(
        "tiny-model",
        help="write a tiny random-weight Qwen2.5-VL checkpoint to DIR",
        description="Write a random-weight Qwen2.5-VL checkpoint to DIR, offline: the exact architecture at a "
        "small size, the real Qwen2 tokenizer, processor and chat template. Its answers are noise.",
    )
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny (default): the toy that `snark serve --tiny` serves (text hidden 64, 2 layers, 10M parameters, "
        "40 MB), for trying every endpoint and for tests; small: text hidden 512, 8 layers of 8 heads of 64, "
        "a 4-block vision tower (108M parameters, 430 MB in float32), a benchmark checkpoint where compute shows",
    )
    tiny.set_defaults(run=_tiny_model)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snark")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"snark: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
