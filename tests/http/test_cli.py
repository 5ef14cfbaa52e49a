"""The ``snark`` command line: help, version, and its logs (progress as lines off a terminal, no health checks)."""

from __future__ import annotations

import logging

import pytest
from tqdm.auto import tqdm

from snark import cli
from snark.logs import HealthCheckFilter, configure_logging
from snark.progress import ProgressLines, progress_class


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == "snark 0.1.0"


def test_bare_snark_prints_help(capsys) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: snark" in out and "serve" in out and "tiny-model" in out and "docs/configuration.md" in out


def test_serve_help_describes_itself_and_points_to_the_settings(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exited.value.code == 0
    assert "Start the HTTP server" in out and "SNARK_SHUTDOWN_GRACE_S" in out
    assert "Settings table in docs/configuration.md" in out


def test_tiny_model_help_describes_both_sizes(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["tiny-model", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    assert "--size {tiny,small}" in out and "tiny (default)" in out and "108M parameters" in out
    assert cli.build_parser().parse_args(["tiny-model", "d"]).size == "tiny"
    assert cli.build_parser().parse_args(["tiny-model", "d", "--size", "small"]).size == "small"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["tiny-model", "d", "--size", "huge"])


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(caplog) -> None:
    assert progress_class(interactive=True) is tqdm and progress_class(interactive=False) is ProgressLines
    with caplog.at_level(logging.INFO, logger="snark.progress"):
        with ProgressLines(total=8, desc="Loading weights") as bar:
            for _ in range(8):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Loading weights: 0 of 8",
        "Loading weights: 25% (2 of 8)",
        "Loading weights: 50% (4 of 8)",
        "Loading weights: 75% (6 of 8)",
        "Loading weights: 100% (8 of 8)",
    ]


def test_download_progress_counts_bytes(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="snark.progress"):
        with ProgressLines(total=3_000_000_000, desc="Downloading", unit="B") as bar:
            bar.update(3_000_000_000)
    assert [r.getMessage() for r in caplog.records][-1] == "Downloading: 100% (3.00 GB of 3.00 GB)"


def test_iterated_progress_logs_its_end(caplog) -> None:
    # transformers iterates its bars ("for name in tqdm(weights)"), which never calls update().
    with caplog.at_level(logging.INFO, logger="snark.progress"):
        assert sum(ProgressLines(range(10), desc="Loading weights")) == 45
    assert [r.getMessage() for r in caplog.records][-1] == "Loading weights: 100% (10 of 10)"


def test_health_checks_leave_the_access_log_unless_asked(test_settings) -> None:
    access = logging.getLogger("uvicorn.access")
    before = list(access.filters)

    def quiet_filters() -> int:
        return sum(isinstance(f, HealthCheckFilter) for f in access.filters)

    try:
        configure_logging(test_settings.model_copy(update={"log_health_checks": False}))
        configure_logging(test_settings.model_copy(update={"log_health_checks": False}))  # twice: still one filter
        assert quiet_filters() == 1
        configure_logging(test_settings.model_copy(update={"log_health_checks": True}))
        assert quiet_filters() == 0
    finally:
        access.filters[:] = before
