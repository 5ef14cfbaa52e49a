"""Per-request timings -> one row of figures per run -> one printed table, ratios and JSON."""

from __future__ import annotations

import itertools
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch


@dataclass
class RequestTiming:
    """One request, in ``time.perf_counter()`` seconds."""

    sent_at: float
    first_text_at: float | None
    done_at: float
    output_tokens: int
    chunk_times: list[float] = field(default_factory=list)  # each streamed chunk or event that carried text
    max_tokens: int | None = None  # what was asked for; with ignore_eos, what should come back
    error: str | None = None  # the request failed: no figures but this

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latency: the gaps between successive text-carrying chunks. A server that packs
        several tokens into one chunk shows fewer, longer gaps; that is what its client sees."""
        return [later - earlier for earlier, later in itertools.pairwise(self.chunk_times)]

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_at is None else self.first_text_at - self.sent_at

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.first_text_at is None or self.output_tokens < 2:
            return None
        return (self.done_at - self.first_text_at) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.done_at - self.sent_at

    def record(self, origin: float) -> dict:
        """This request as saved JSON: times relative to ``origin`` (the run's start), in seconds."""
        return {
            "sent_at_s": self.sent_at - origin,
            "max_tokens": self.max_tokens,
            "output_tokens": self.output_tokens,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "itl_s": self.itl_s,
            "error": self.error,
        }


@dataclass
class Row:
    mode: str  # "batched", "serial", "raw generate", "HTTP", "transformers CB"
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    tpot_p50_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    speedup_vs_serial: float | None = None
    note: str = ""
    timings: list[RequestTiming] = field(default_factory=list, repr=False)  # empty for the ceilings

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def percentile(values: list[float], q: float) -> float | None:
    """Linearly interpolated percentile (``q`` in 0..100), as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_percentiles(name: str, seconds: list[float], quantiles: tuple[int, ...] = (50, 95, 99)) -> dict:
    """``{"<name> p50 ms": ..., "<name> p95 ms": ..., ...}``, None where there are no values."""
    return {f"{name} p{q} ms": None if (value := percentile(seconds, q)) is None else value * 1000 for q in quantiles}


def row_from_timings(mode: str, concurrency: int, timings: list[RequestTiming], wall_s: float, **extra) -> Row:
    ttft = [t.ttft_s for t in timings if t.ttft_s is not None]
    tpot = [t.tpot_s for t in timings if t.tpot_s is not None]
    e2e = [t.e2e_s for t in timings]
    return Row(
        mode=mode,
        concurrency=concurrency,
        requests=len(timings),
        wall_s=wall_s,
        output_tokens=sum(t.output_tokens for t in timings),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        tpot_p50_s=percentile(tpot, 50),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p95_s=percentile(e2e, 95),
        timings=timings,
        **extra,
    )


def burst_summary(rows: list[Row]) -> dict:
    """The rows' figures, flat, for ``--save``; the headline is the first mode's row at its highest
    concurrency (the engine's own, or "HTTP" against a server)."""
    summary: dict[str, float | None] = {}
    if rows:
        top = max((r for r in rows if r.mode == rows[0].mode), key=lambda r: r.concurrency)
        summary["out tok/s at top concurrency"] = top.output_tok_per_s if top.requests else None
    for row in rows:
        name = f"{row.mode} c={row.concurrency}"
        summary[f"{name} out tok/s"] = row.output_tok_per_s if row.requests else None
        summary[f"{name} TTFT p95 ms"] = None if row.ttft_p95_s is None else row.ttft_p95_s * 1000
        summary[f"{name} e2e p95 ms"] = None if row.e2e_p95_s is None else row.e2e_p95_s * 1000
    return summary


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _memory(row: Row) -> str:
    if row.peak_memory_bytes is None:
        return "-"
    return f"{row.peak_memory_bytes / 2**30:.2f} GiB {row.memory_kind}".strip()


COLUMNS = (
    "mode",
    "conc",
    "reqs",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "TPOT ms",
    "e2e p50 ms",
    "e2e p95 ms",
    "peak mem",
    "vs serial",
)


def format_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [
        (
            row.mode + (f" ({row.note})" if row.note else ""),
            str(row.concurrency),
            str(row.requests),
            f"{row.requests_per_s:.2f}",
            f"{row.output_tok_per_s:.1f}",
            _ms(row.ttft_p50_s),
            _ms(row.ttft_p95_s),
            "-" if row.tpot_p50_s is None else f"{row.tpot_p50_s * 1000:.1f}",
            _ms(row.e2e_p50_s),
            _ms(row.e2e_p95_s),
            _memory(row),
            "-" if row.speedup_vs_serial is None else f"{row.speedup_vs_serial:.2f}x",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Ratio:
    name: str
    value: float
    goal: float | None = None  # the ratio the engine should reach, when it has one
    unit: str = "x"

    def line(self) -> str:
        shown = f"{self.value:.2f}x" if self.unit == "x" else f"{self.value * 100:.0f}%"
        if self.goal is None:
            return f"  {self.name:<52} {shown:>8}"
        goal = f"{self.goal:.0f}x" if self.unit == "x" else f"{self.goal * 100:.0f}%"
        verdict = "met" if self.value >= self.goal else "MISSED"
        return f"  {self.name:<52} {shown:>8}   goal >= {goal}: {verdict}"


@dataclass
class Report:
    machine: dict
    settings: dict
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [format_table(self.rows)]
        if self.ratios:
            parts.append("Ratios:\n" + "\n".join(r.line() for r in self.ratios))
        if self.notes:
            parts.append("\n".join(f"Note: {n}" for n in self.notes))
        return "\n\n".join(parts)

    def details_json(self) -> dict:
        """Rows, ratios and notes for ``--save``; each row with its requests' timings (seconds from
        the row's first request)."""
        rows = [
            {
                **{f.name: getattr(r, f.name) for f in fields(Row) if f.name != "timings"},
                "requests_per_s": r.requests_per_s,
                "output_tok_per_s": r.output_tok_per_s,
                "timings": [t.record(min(x.sent_at for x in r.timings)) for t in r.timings],
            }
            for r in self.rows
        ]
        return {"rows": rows, "ratios": [asdict(r) for r in self.ratios], "notes": self.notes}


def machine_info(device: torch.device | None) -> dict:
    """What the figures were measured on."""
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
    )
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
