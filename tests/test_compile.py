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
from snark.engine.compile import (
    CACHE_FLOOR_TOKENS,
    DecodeCaches,
    batch_buckets,
    cache_length_bucket,
    compile_config,
    require_cuda,
)
from snark.engine.engine import EngineState
from snark.engine.request import ChatTurn, SamplingParams
from snark.engine.tiny_model import tiny_config
from snark.errors import ConfigError
from snark.server import build_engine, create_app
from tests.conftest import free_port, serve, start_engine


def test_batch_buckets_are_powers_of_two_up_to_the_max():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]


def test_cache_lengths_are_powers_of_two_from_the_floor_within_the_ceiling():
    ceiling = 32768 + 2048
    assert cache_length_bucket(10, ceiling=ceiling) == CACHE_FLOOR_TOKENS == 2048
    assert cache_length_bucket(2048, ceiling=ceiling) == 2048
    assert cache_length_bucket(2049, ceiling=ceiling) == 4096
    assert cache_length_bucket(20000, ceiling=ceiling) == 32768
    assert cache_length_bucket(33000, ceiling=ceiling) == ceiling  # not 65536: no request is longer
    assert cache_length_bucket(300, ceiling=1000, floor=256) == 512
    assert cache_length_bucket(900, ceiling=1000, floor=256) == 1000


def test_compile_config_is_static_shapes_with_cuda_graphs_on_cuda():
    config = compile_config(torch.device("cuda"))
    assert (config.dynamic, config.fullgraph, config.mode) == (False, False, "reduce-overhead")
    assert not config._compile_all_devices
    assert compile_config(torch.device("cpu"))._compile_all_devices


def test_decode_caches_are_kept_per_bucket_and_reset_in_place():
    caches = DecodeCaches(tiny_config(), floor=256)
    first = caches.get(4, 100, ceiling=4096)
    assert caches.get(4, 250, ceiling=4096) is first  # same tensors: CUDA graphs replay
    assert caches.get(2, 100, ceiling=4096) is not first
    assert caches.held == {4: 256, 2: 256}
    longer = caches.get(4, 300, ceiling=4096)
    assert longer is not first and caches.held == {4: 512}  # a long cache evicts the others
    assert caches.get(4, 100, ceiling=4096) is longer


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
    compiled = start_engine(tiny_model_dir, max_batch_size=4, compile_decode=True, allow_cpu_compile=True)
    try:
        graphs = counters["stats"]["unique_graphs"]
        assert compiled.loaded.model._compiled_call is not None
        assert compiled._decode_caches.held == {1: 2048, 2: 2048, 4: 2048}  # every bucket warmed
        assert asyncio.run(run(compiled, prompts)) == expected  # 3 rows, padded to the bucket of 4
        assert asyncio.run(run(compiled, prompts[:1])) == expected[:1]
        assert counters["stats"]["unique_graphs"] == graphs  # no compile after start-up
    finally:
        compiled.stop()
