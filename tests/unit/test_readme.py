"""The docs stay true: every setting is documented, and README.md's set-up commands are the real ones."""

from __future__ import annotations

from pathlib import Path

from snark.cli import build_parser
from snark.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_every_setting_is_documented():
    missing = [env_name(n) for n in Settings.model_fields if f"`{env_name(n)}`" not in CONFIGURATION]
    assert missing == []


def test_setup_commands_exist():
    assert "uv run snark serve --tiny" in README and "uv run pytest" in README
    args = build_parser().parse_args(["serve", "--tiny", "--host", "0.0.0.0", "--port", "8123"])
    assert args.tiny and args.port == 8123
