"""The engine's ratios and their goals, read off the table's rows, and the memory-bandwidth roofline."""

from __future__ import annotations

from bench.report import Ratio, Report, Row

# Goals, set for the tiny model on CPU and 16 concurrent requests; other runs print the same ratios
# without them.
GOALS = {"batched_vs_serial": 5.0, "batched_vs_raw": 0.85, "http_vs_raw": 0.95}
ENGINE_MODES = ("batched", "serial")


def roofline_tok_s(weight_bytes: int, bandwidth_gbs: float) -> float:
    """Decode steps per second if a step did nothing but stream the weights once at full bandwidth."""
    return bandwidth_gbs * 1e9 / weight_bytes


def find_row(rows: list[Row], mode: str, concurrency: int) -> Row | None:
    return next((r for r in rows if r.mode == mode and r.concurrency == concurrency and r.requests), None)


def add_ratios(report: Report, *, top: int, with_goals: bool) -> None:
    """Speed-ups over serial on every engine row, then the ratios (``top``: the highest concurrency)."""
    rows = report.rows
    goals = dict(GOALS) if with_goals else {}
    if top < 16:  # the batching goals are for 16 concurrent requests
        goals = {name: value for name, value in goals.items() if name == "http_vs_raw"}
    best = "batched"
    serial = find_row(rows, "serial", top)
    if serial:
        for row in rows:
            if row.mode in ENGINE_MODES:
                row.speedup_vs_serial = row.output_tok_per_s / serial.output_tok_per_s
    raw_1, raw_top = find_row(rows, "raw generate", 1), find_row(rows, "raw generate", top)
    pairs = [
        (f"{best} c={top} vs serial (batch size 1)", find_row(rows, best, top), serial, "x", "batched_vs_serial"),
        (f"{best} c={top} vs raw generate at batch {top}", find_row(rows, best, top), raw_top, "%", "batched_vs_raw"),
        (f"{best} c=1 vs raw generate at batch 1", find_row(rows, best, 1), raw_1, "%", None),
        ("HTTP JSON c=1 vs raw generate at batch 1", find_row(rows, "HTTP JSON", 1), raw_1, "%", "http_vs_raw"),
        ("HTTP streamed c=1 vs raw generate at batch 1", find_row(rows, "HTTP", 1), raw_1, "%", None),
        (f"raw generate batch {top} vs batch 1 (the ceiling's gain)", raw_top, raw_1, "x", None),
        (
            f"transformers CB vs {best} c={top}",
            find_row(rows, "transformers CB", top),
            find_row(rows, best, top),
            "%",
            None,
        ),
    ]
    seen: set[tuple[int, int]] = set()
    for name, numerator, denominator, unit, goal in pairs:
        if not numerator or not denominator or numerator is denominator:
            continue
        if (id(numerator), id(denominator)) in seen:  # with --concurrency 1, c=top is c=1
            continue
        seen.add((id(numerator), id(denominator)))
        value = numerator.output_tok_per_s / denominator.output_tok_per_s
        report.ratios.append(Ratio(name, value, goals.get(goal), unit))
    if goals:
        report.notes.append("the goals are set for the tiny model on CPU")


def add_roofline(report: Report, *, weight_bytes: int, bandwidth_gbs: float, top: int) -> None:
    """Each engine row's decode rate per stream (1 / TPOT, prefill excluded) against the rate at
    which a step could stream the weights; batching shares those bytes among the rows of a step."""
    per_stream = roofline_tok_s(weight_bytes, bandwidth_gbs)
    report.notes.append(
        f"roofline: {weight_bytes / 1e9:.2f} GB of weights per decode step at {bandwidth_gbs:.0f} GB/s = "
        f"{per_stream:.0f} tok/s for one stream, {per_stream * top:.0f} tok/s for {top} (KV-cache reads ignored)"
    )
    for row in report.rows:
        if row.mode in ENGINE_MODES and row.tpot_p50_s:
            name = f"{row.mode} c={row.concurrency}: decode steps/s vs roofline"
            report.ratios.append(Ratio(name, (1 / row.tpot_p50_s) / per_stream, None, "%"))
