"""Start-up: settings are validated before any weight loads, and a missing model fails fast, clearly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from snark import cli
from snark.config import load_settings, model_id_for_size
from snark.engine.loader import load_model
from snark.errors import ConfigError
from snark.serve import bind_listener
from tests.conftest import free_port


@pytest.mark.parametrize("size", ["3B", "7b", "32B", "72B"])
def test_sizes_map_to_hub_ids(size):
    assert model_id_for_size(size) == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"


def test_default_is_7b_and_vlm_model_wins(monkeypatch):
    monkeypatch.delenv("VLM_SIZE", raising=False)
    monkeypatch.delenv("VLM_MODEL", raising=False)
    assert load_settings().model_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    monkeypatch.setenv("VLM_SIZE", "3B")
    monkeypatch.setenv("VLM_MODEL", "/models/my-qwen")
    assert load_settings().model_id == "/models/my-qwen"


def test_14b_is_refused_with_the_valid_sizes(monkeypatch):
    monkeypatch.setenv("VLM_SIZE", "14B")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "There is no Qwen2.5-VL-14B" in message
    assert "3B, 7B, 32B, 72B" in message and "VLM_MODEL" in message and "snark serve --tiny" in message


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("SNARK_PORT", "abc", "SNARK_PORT='abc': Input should be a valid integer"),
        ("SNARK_MAX_BATCH_SIZE", "0", "SNARK_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1"),
        ("SNARK_ALLOW_PRIVATE_URLS", "maybe", "SNARK_ALLOW_PRIVATE_URLS='maybe'"),
        ("VLLM_TP_SIZE", "0", "VLLM_TP_SIZE='0'"),
    ],
)
def test_bad_values_name_the_environment_variable(monkeypatch, variable, value, said):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert said in str(caught.value)


def test_bad_flag_values_name_the_flag_and_secrets_stay_out_of_messages(monkeypatch):
    with pytest.raises(ConfigError, match="--port=0: Input should be greater than or equal to 1"):
        load_settings(sources={"port": "--port"}, port=0)
    with pytest.raises(ConfigError) as caught:
        load_settings(api_key=["not", "a", "string"])
    assert "SNARK_API_KEY: " in str(caught.value) and "'not'" not in str(caught.value)


def test_a_port_in_use_stops_serve_before_any_model_work(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model folder that does not exist: had serve gone on to load it, the message would be about it.
        assert cli.main(["serve", "--port", str(port), "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is already in use" in err and "--port" in err and "SNARK_PORT" in err
    assert "VLM_MODEL" not in err and "config.json" not in err


def test_the_port_is_taken_as_soon_as_it_is_checked():
    # Bound and listening: a second check (a second Snark starting at the same moment) is refused.
    first = bind_listener("127.0.0.1", 0)
    with first, pytest.raises(ConfigError, match="already in use"):
        bind_listener("127.0.0.1", first.getsockname()[1])


def test_an_unknown_host_names_the_host_setting():
    with pytest.raises(ConfigError, match="--host or SNARK_HOST"):
        bind_listener("no-such-host.invalid", 8123)


def test_missing_local_folder_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="snark serve --tiny"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_unreachable_hub_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as caught:
        load_model("Qwen/Qwen2.5-VL-7B-Instruct", device="cpu")
    assert "VLM_MODEL" in str(caught.value) and "snark serve --tiny" in str(caught.value)


def _snark(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "snark.cli", *args], env=full_env, capture_output=True, text=True, timeout=180
    )


def test_cli_refuses_14b_before_loading_anything():
    result = _snark("serve", VLM_SIZE="14B")
    assert result.returncode == 2
    assert "There is no Qwen2.5-VL-14B" in result.stderr


def test_cli_exits_non_zero_when_the_weights_are_missing():
    result = _snark("serve", "--port", str(free_port()), VLM_MODEL="Qwen/Qwen2.5-VL-7B-Instruct", VLM_SIZE="7B")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "snark serve --tiny" in result.stderr
