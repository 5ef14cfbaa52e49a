"""SNARK_COMPILE=1: shape bucketing, the CUDA-only refusal, and the compiled path itself.

No GPU here: the compiled path runs through ``Engine(allow_cpu_compile=True)``, which compiles the
same decode step with inductor's C++ backend (``CompileConfig._compile_all_devices``), so the
static caches, padding rows, warm-up and "no recompiles after warm-up" are tested for real; only
CUDA graphs (``mode="reduce-overhead"``) are not.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import torch
from torch._dynamo.utils import counters

from snark.config import load_settings
from snark.engine.base import EngineState
from snark.engine.request import ChatTurn, SamplingParams
from snark.engine.transformers.compiled import (
    COMPILED_COLUMN_FLOOR,
    column_bucket,
    compile_options,
    require_cuda,
    row_buckets,
)
from snark.errors import ConfigError
from snark.server import build_engine, create_app
from tests.conftest import free_port, serve, start_engine


def test_row_buckets_are_powers_of_two_up_to_the_max():
    assert row_buckets(16) == [1, 2, 4, 8, 16]
    assert row_buckets(12) == [1, 2, 4, 8, 12]
    assert row_buckets(1) == [1]


def test_cache_columns_are_powers_of_two_from_the_floor():
    assert column_bucket(10) == COMPILED_COLUMN_FLOOR == 2048
    assert column_bucket(2048) == 2048
    assert column_bucket(2049) == 4096
    assert column_bucket(20000) == 32768
    assert column_bucket(300, floor=256) == 512


def test_compile_options_are_static_shapes_with_cuda_graphs_on_cuda():
    assert compile_options(torch.device("cuda")) == {"dynamic": False, "fullgraph": False, "mode": "reduce-overhead"}
    assert compile_options(torch.device("cpu"))["mode"] == "default"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_require_cuda_refuses_a_machine_without_cuda():
    with pytest.raises(ConfigError, match="SNARK_COMPILE=1 .* no CUDA device is visible"):
        require_cuda()


def test_require_cuda_refuses_a_model_loaded_on_cpu():
    with pytest.raises(ConfigError, match="Unset SNARK_COMPILE"):
        require_cuda(torch.device("cpu"))


def test_compile_on_cpu_fails_the_engine_load_clearly(tiny_model_dir):
    with pytest.raises(ConfigError, match="SNARK_COMPILE=1"):
        start_engine(tiny_model_dir, compile_decode=True)


def test_compile_on_cpu_shows_in_health(tiny_model_dir):
    settings = load_settings(vlm_model=tiny_model_dir, device="cpu", compile=True)
    engine = build_engine(settings)
    engine.start()  # started here, so the app neither starts it nor shuts down on its failure
    with pytest.raises(ConfigError):
        engine.wait_ready(60)
    with serve(create_app(settings, engine=engine)) as url:
        reply = httpx.get(f"{url}/health")
    assert engine.state is EngineState.FAILED
    assert reply.status_code == 503
    assert reply.json()["status"] == "failed" and "SNARK_COMPILE" in reply.json()["error"]


def test_snark_serve_with_compile_on_cpu_exits_non_zero_with_the_message(tiny_model_dir):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SNARK_COMPILE": "1",
        "SNARK_DEVICE": "cpu",
        "VLM_MODEL": tiny_model_dir,
    }
    result = subprocess.run(
        [sys.executable, "-m", "snark.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "SNARK_COMPILE=1 compiles the decode step for CUDA GPUs" in result.stderr


def test_compiled_engine_matches_eager_and_never_recompiles_after_warm_up(tiny_model_dir, tiny_engine):
    texts = ["Hi.", "Tell me about bicycles, at length.", "2 + 2 = ?"]
    prompts = [tiny_engine.prompts.build([ChatTurn("user", [t])], min_pixels=0, max_pixels=0) for t in texts]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def run(engine, batch):
        return [r.text for r in await asyncio.gather(*(engine.generate(p, params) for p in batch))]

    expected = asyncio.run(run(tiny_engine, prompts))
    compiled = start_engine(tiny_model_dir, max_batch_size=2, compile_decode=True, allow_cpu_compile=True)
    try:
        graphs = counters["stats"]["unique_graphs"]
        assert compiled.runner.compiled_step is not None and graphs >= 2  # one per row bucket (1, 2)
        assert compiled.cache.keys[0].shape[0] == 2 and compiled.cache.columns == COMPILED_COLUMN_FLOOR
        # Three rows on a 2-row engine: two run (one bucket), the third joins as one ends (the other).
        assert asyncio.run(run(compiled, prompts)) == expected
        assert asyncio.run(run(compiled, prompts[:1])) == expected[:1]
        assert counters["stats"]["unique_graphs"] == graphs  # no compile after start-up
    finally:
        compiled.stop()
