"""Saved runs (``--save``) and the side-by-side table of several (``--compare``).

A run is one workload against one server: its label, settings, machine, a flat summary of figures
and every request's timings. Comparing servers fairly on a shared machine takes rounds in the order
A, B, B, A; the table keeps each label's better round, judged by the workload's headline figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from snark.errors import ConfigError

FORMAT = "snark-bench-run/1"

# Per workload: the figure that decides which of a label's rounds is kept, and which way is better.
HEADLINE = {
    "burst": ("out tok/s at top concurrency", "higher"),
    "poisson": ("TTFT p95 ms", "lower"),
    "hol": ("short e2e under load / idle", "lower"),
    "structured": ("json_schema / free at top concurrency", "higher"),
    "conversation": ("turns 2+ TTFT p50 ms", "lower"),
    "image-repeat": ("questions 2+ TTFT p50 ms", "lower"),
    "video": ("questions 2+ TTFT p50 ms", "lower"),
    "long-short": ("aggregate out tok/s", "higher"),
}

# The settings shown above the figures, so that runs made with different loads are seen to differ.
SHOWN_SETTINGS = {
    "burst": ("concurrency", "requests", "max_tokens", "image"),
    "poisson": ("rate", "requests", "output_lens", "seed", "image"),
    "hol": ("hol_long", "hol_long_tokens", "hol_short_tokens", "hol_delay_s", "image"),
    "structured": ("concurrency", "requests", "max_tokens", "repeats"),
    "conversation": ("turns", "max_tokens", "image", "repeats", "reuse_inputs"),
    "image-repeat": ("questions", "max_tokens", "image", "repeats", "reuse_inputs"),
    "video": (
        "concurrency",
        "questions",
        "max_tokens",
        "video_seconds",
        "video_fps",
        "video_size",
        "video_sample_fps",
        "repeats",
        "reuse_inputs",
    ),
    "long-short": (
        "long_prompt_tokens",
        "long_tokens",
        "short_requests",
        "short_tokens",
        "short_delay_s",
        "reuse_inputs",
    ),
}


@dataclass
class Measured:
    """What a workload produced: its figures, and one JSON record per request."""

    summary: dict[str, float | int | None]
    requests: list[dict]


def run_record(
    *, workload: str, label: str, endpoint: str, model: str, settings: dict, machine: dict, measured: Measured, **extra
) -> dict:
    return {
        "format": FORMAT,
        "workload": workload,
        "label": label,
        "endpoint": endpoint,  # where the requests went
        "model": model,
        "settings": settings,
        "machine": machine,
        "summary": measured.summary,
        "requests": measured.requests,
        **extra,
    }


def save_run(path: str | Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_run(path: str | Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--compare {path}: cannot read it: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConfigError(f'--compare {path}: not a run saved by --save (no "format": "{FORMAT}").')
    return record


def better_round(records: list[dict]) -> dict:
    """The record whose headline figure is best; a round without the figure (it failed) loses."""
    metric, better = HEADLINE[records[0]["workload"]]
    scored = [r for r in records if r["summary"].get(metric) is not None]
    if not scored:
        return records[0]
    pick = min if better == "lower" else max
    return pick(scored, key=lambda r: r["summary"][metric])


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def compare_table(runs: list[tuple[str, dict]]) -> str:
    """A markdown table of ``(file name, record)`` runs of one workload: one column per label (its
    better round when it has several), one row per figure."""
    workloads = {record["workload"] for _, record in runs}
    if len(workloads) != 1:
        raise ConfigError(f"--compare: these runs are of different workloads ({', '.join(sorted(workloads))}).")
    workload = workloads.pop()
    by_label: dict[str, list[tuple[str, dict]]] = {}
    for name, record in runs:
        by_label.setdefault(record["label"], []).append((name, record))
    kept = {label: better_round([r for _, r in rounds]) for label, rounds in by_label.items()}
    kept_file = {label: next(n for n, r in by_label[label] if r is kept[label]) for label in by_label}

    rows: list[tuple[str, list[str]]] = []
    several_rounds = any(len(rounds) > 1 for rounds in by_label.values())
    if several_rounds:
        rows.append(("kept round", [f"{kept_file[label]} (of {len(by_label[label])})" for label in by_label]))
    rows += [
        ("model", [kept[label]["model"] for label in by_label]),
        ("endpoint", [kept[label]["endpoint"] for label in by_label]),
    ]
    for key in SHOWN_SETTINGS[workload]:  # named as the command line names them
        flag = "--" + key.replace("_", "-")
        rows.append((flag, [format_value(kept[label]["settings"].get(key)) for label in by_label]))
    metrics: list[str] = []
    for record in kept.values():
        metrics += [key for key in record["summary"] if key not in metrics]
    for metric in metrics:
        rows.append((metric, [format_value(kept[label]["summary"].get(metric)) for label in by_label]))

    lines = [
        f"| {workload} | " + " | ".join(by_label) + " |",
        "|---|" + "---:|" * len(by_label),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows),
    ]
    if not several_rounds:
        return "\n".join(lines)
    metric, better = HEADLINE[workload]
    return "\n".join(lines) + f"\n\nEach label's kept round is its run with the {better} {metric}."
