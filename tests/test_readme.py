"""README.md stays true: every setting is documented, and the set-up commands are the real ones."""

from __future__ import annotations

from pathlib import Path

from snark.cli import build_parser
from snark.config import Settings, env_name

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [env_name(n) for n in Settings.model_fields if f"`{env_name(n)}`" not in README]
    assert missing == []


def test_setup_commands_exist():
    assert "uv run snark serve --tiny" in README and "uv run pytest" in README
    args = build_parser().parse_args(["serve", "--tiny", "--host", "0.0.0.0", "--port", "8123"])
    assert args.tiny and args.port == 8123
