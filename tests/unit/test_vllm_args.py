"""Settings -> vLLM engine arguments, and Snark's sampling -> vLLM's, in the default environment.

No vLLM here: these are the pure mappings the vLLM engine hands to ``AsyncEngineArgs`` and
``SamplingParams`` (tests/http/test_vllm_engine.py checks that vLLM itself accepts them, and serves).
Multi-node Ray cannot run on one machine: its settings are tested as the arguments they become.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from snark.config import VLLM_DERIVED_ARGS, load_settings
from snark.engine.vllm.args import engine_args, max_num_seqs, prompt_token_limit
from snark.engine.vllm.sampling import vllm_sampling_fields
from snark.errors import ConfigError
from snark.values import SamplingParams

VLLM_ENV = (
    "VLLM_TP_SIZE",
    "VLLM_PP_SIZE",
    "VLLM_GPU_MEM_UTILIZATION",
    "VLLM_MAX_MODEL_LEN",
    "VLLM_MAX_NUM_SEQS",
    "VLLM_ENFORCE_EAGER",
    "VLLM_DISTRIBUTED_BACKEND",
    "VLLM_ENGINE_ARGS",
    "SNARK_ENGINE",
    "SNARK_MAX_BATCH_SIZE",
    "SNARK_KV_CACHE_GIB",
    "VLM_SIZE",
    "VLM_MODEL",
    "VLLM_CPU_KVCACHE_SPACE",
)


@pytest.fixture
def env(monkeypatch):
    """A clean slate of engine settings; ``env(NAME=value, ...)`` sets some and returns the settings."""
    for name in VLLM_ENV:
        monkeypatch.delenv(name, raising=False)

    def settings(**values: str):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return settings


# --- which engine ---------------------------------------------------------------------------------
def test_auto_is_transformers_without_vllm_settings(env):
    assert env().engine_name == "transformers"


def test_auto_is_vllm_when_a_vllm_setting_is_given(env):
    assert env(VLLM_TP_SIZE="2").engine_name == "vllm"


def test_vllms_own_variables_do_not_switch_engines(env):
    assert env(VLLM_CPU_KVCACHE_SPACE="2").engine_name == "transformers"


def test_transformers_with_vllm_settings_is_refused(env):
    with pytest.raises(ConfigError, match="SNARK_ENGINE=transformers, but VLLM_PP_SIZE"):
        env(SNARK_ENGINE="transformers", VLLM_PP_SIZE="2")


def test_vllm_without_vllm_settings_uses_snark_defaults(env):
    args = engine_args(env(SNARK_ENGINE="vllm", VLM_SIZE="7B"), model_context_len=128000)
    assert args == {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "max_model_len": 32768 + 2048,
        "max_num_seqs": 16,
        "limit_mm_per_prompt": {"image": 8, "video": 2},
        "mm_processor_kwargs": {
            "images_kwargs": {"size": {"shortest_edge": 28 * 28, "longest_edge": 1003520}},
            "videos_kwargs": {
                "size": {"shortest_edge": 28 * 28, "longest_edge": 768 * 28 * 28},
                "do_sample_frames": False,
                "cap_pixels_per_frame": False,
            },
        },
        "logprobs_mode": "processed_logprobs",
    }


# --- parallelism -----------------------------------------------------------------------------------
def test_the_headline_command_runs_vllm_with_tensor_parallel_two(env):
    settings = env(VLLM_GPU_MEM_UTILIZATION="0.55", VLLM_TP_SIZE="2", VLM_SIZE="32B")
    args = engine_args(settings, model_context_len=128000)
    assert settings.engine_name == "vllm"
    assert args["model"] == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert args["tensor_parallel_size"] == 2 and args["gpu_memory_utilization"] == 0.55
    assert "pipeline_parallel_size" not in args and "distributed_executor_backend" not in args  # vLLM's defaults


def test_ray_multi_node_maps_tp_within_and_pp_across_nodes(env):
    settings = env(VLM_SIZE="72B", VLLM_TP_SIZE="8", VLLM_PP_SIZE="2", VLLM_DISTRIBUTED_BACKEND="ray")
    args = engine_args(settings, model_context_len=128000)
    assert args["tensor_parallel_size"] == 8
    assert args["pipeline_parallel_size"] == 2
    assert args["distributed_executor_backend"] == "ray"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VLLM_DISTRIBUTED_BACKEND", "nccl"),
        ("VLLM_TP_SIZE", "0"),
        ("VLLM_GPU_MEM_UTILIZATION", "1.5"),
        ("VLLM_PP_SIZE", "two"),
    ],
)
def test_bad_vllm_settings_stop_start_up_with_their_name(env, name, value):
    with pytest.raises(ConfigError, match=name):
        env(**{name: value})


def test_enforce_eager_is_passed_through(env):
    assert engine_args(env(VLLM_ENFORCE_EAGER="1"))["enforce_eager"] is True


# --- the escape hatch ------------------------------------------------------------------------------
def test_engine_args_json_reaches_vllm_as_given(env):
    args = engine_args(
        env(VLLM_ENGINE_ARGS='{"dtype": "float16", "max_num_batched_tokens": 8192, "quantization": null}')
    )
    assert args["dtype"] == "float16" and args["max_num_batched_tokens"] == 8192 and args["quantization"] is None


def test_engine_args_json_alone_chooses_vllm(env):
    assert env(VLLM_ENGINE_ARGS='{"dtype": "float16"}').engine_name == "vllm"


@pytest.mark.parametrize("value", ["{dtype: float16}", '["dtype"]', '"float16"'])
def test_engine_args_must_be_a_json_object(env, value):
    with pytest.raises(ConfigError, match="VLLM_ENGINE_ARGS"):
        env(VLLM_ENGINE_ARGS=value)


@pytest.mark.parametrize("key", sorted(VLLM_DERIVED_ARGS))
def test_engine_args_may_not_set_what_a_setting_sets(env, key):
    with pytest.raises(ConfigError, match=f"may not set {key}"):
        env(VLLM_ENGINE_ARGS=f'{{"{key}": 1}}')


# --- overlapping settings, one rule each -----------------------------------------------------------
def test_max_num_seqs_defaults_to_snarks_batch_size(env):
    assert engine_args(env(SNARK_ENGINE="vllm", SNARK_MAX_BATCH_SIZE="8"))["max_num_seqs"] == 8


def test_vllm_max_num_seqs_wins_when_snark_batch_size_is_not_given(env):
    settings = env(VLLM_MAX_NUM_SEQS="128")
    assert engine_args(settings)["max_num_seqs"] == 128 and max_num_seqs(settings) == 128


def test_batch_size_and_max_num_seqs_may_agree(env):
    assert engine_args(env(VLLM_MAX_NUM_SEQS="32", SNARK_MAX_BATCH_SIZE="32"))["max_num_seqs"] == 32


def test_batch_size_and_max_num_seqs_that_disagree_are_refused(env):
    with pytest.raises(ConfigError, match="SNARK_MAX_BATCH_SIZE=8 and VLLM_MAX_NUM_SEQS=32 disagree"):
        env(VLLM_MAX_NUM_SEQS="32", SNARK_MAX_BATCH_SIZE="8")


def test_max_model_len_defaults_to_what_snark_can_send_within_the_models_context(env):
    settings = env(SNARK_ENGINE="vllm")
    assert engine_args(settings, model_context_len=128000)["max_model_len"] == 32768 + 2048
    assert engine_args(settings, model_context_len=32768)["max_model_len"] == 32768
    assert prompt_token_limit(settings, 32768) == 32767  # one token must fit after the prompt


def test_vllm_max_model_len_wins_and_bounds_prompts(env):
    settings = env(VLLM_MAX_MODEL_LEN="4096")
    assert engine_args(settings, model_context_len=128000)["max_model_len"] == 4096
    assert prompt_token_limit(settings, 4096) == 4095


def test_kv_cache_gib_is_vllms_kv_cache_bytes(env):
    assert engine_args(env(SNARK_ENGINE="vllm", SNARK_KV_CACHE_GIB="2"))["kv_cache_memory_bytes"] == 2 * 1024**3


def test_kv_cache_gib_and_memory_fraction_are_refused_together(env):
    with pytest.raises(ConfigError, match="SNARK_KV_CACHE_GIB .* VLLM_GPU_MEM_UTILIZATION"):
        env(SNARK_KV_CACHE_GIB="2", VLLM_GPU_MEM_UTILIZATION="0.5")


def test_media_limits_become_vllms_image_and_video_bounds(env, monkeypatch):
    monkeypatch.setenv("SNARK_MAX_IMAGE_PIXELS", str(256 * 28 * 28))
    monkeypatch.setenv("SNARK_MIN_IMAGE_PIXELS", str(8 * 28 * 28))
    monkeypatch.setenv("SNARK_MAX_IMAGES_PER_REQUEST", "2")
    monkeypatch.setenv("SNARK_MAX_VIDEO_FRAME_PIXELS", str(64 * 28 * 28))
    monkeypatch.setenv("SNARK_MIN_VIDEO_FRAME_PIXELS", str(16 * 28 * 28))
    monkeypatch.setenv("SNARK_MAX_VIDEOS_PER_REQUEST", "3")
    args = engine_args(env(SNARK_ENGINE="vllm"))
    kwargs = args["mm_processor_kwargs"]
    # Per modality: a flat size would reach the image and the video processor alike.
    assert kwargs["images_kwargs"] == {"size": {"shortest_edge": 28 * 28, "longest_edge": 256 * 28 * 28}}
    # Snark has sampled and resized the frames: vLLM samples none, and its bounds are only its profiling's
    # (each request brings bounds that hold its own frames).
    assert kwargs["videos_kwargs"]["size"] == {"shortest_edge": 28 * 28, "longest_edge": 64 * 28 * 28}
    assert (
        kwargs["videos_kwargs"]["do_sample_frames"] is False
        and kwargs["videos_kwargs"]["cap_pixels_per_frame"] is False
    )
    assert set(kwargs) == {"images_kwargs", "videos_kwargs"}
    assert args["limit_mm_per_prompt"] == {"image": 2, "video": 3}


# --- sampling --------------------------------------------------------------------------------------
def test_every_sampling_field_is_mapped():
    """A field added to Snark's SamplingParams must reach vLLM: this fails until it is mapped."""
    renamed = {"max_new_tokens": "max_tokens", "structure": "structured_outputs"}
    fields = vllm_sampling_fields(SamplingParams())
    assert [f.name for f in dataclasses.fields(SamplingParams) if renamed.get(f.name, f.name) not in fields] == []


def test_sampled_request_keeps_every_field():
    params = SamplingParams(
        max_new_tokens=7,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        seed=3,
        stop=("\n\n", "END"),
        repetition_penalty=1.05,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        ignore_eos=True,
    )
    fields = vllm_sampling_fields(params)
    assert (
        fields["max_tokens"] == 7 and fields["temperature"] == 0.7 and fields["top_p"] == 0.9 and fields["top_k"] == 20
    )
    assert fields["seed"] == 3 and fields["stop"] == ["\n\n", "END"] and fields["ignore_eos"] is True
    assert (fields["repetition_penalty"], fields["frequency_penalty"], fields["presence_penalty"]) == (1.05, 0.5, -0.5)
    assert fields["n"] == 1 and fields["skip_special_tokens"] is True and fields["include_stop_str_in_output"] is False


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-6, top_p=0.5),
        SamplingParams(temperature=0.8, top_k=1),
    ],
)
def test_greedy_requests_are_greedy_on_vllm(params):
    fields = vllm_sampling_fields(params)
    assert (fields["temperature"], fields["top_p"], fields["top_k"]) == (0.0, 1.0, 0)


def test_no_top_k_cut_is_vllms_zero():
    assert vllm_sampling_fields(SamplingParams(temperature=1.0, top_k=0))["top_k"] == 0


def test_the_mappings_do_not_import_vllm():
    modules = "snark.config, snark.engine.vllm.args, snark.engine.vllm.sampling, snark.server"
    code = f"import sys, {modules}; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_asking_for_vllm_without_it_names_the_install_command(tmp_path, tiny_model_dir):
    """The default environment has no vLLM: `snark serve` stops at once with the command to run."""
    assert importlib.util.find_spec("vllm") is None
    env = {"SNARK_ENGINE": "vllm", "VLM_MODEL": tiny_model_dir, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "snark.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "uv sync --extra vllm" in result.stderr


def test_benchmark_on_vllm_without_it_names_the_install_command(tmp_path):
    env = {
        "VLLM_TP_SIZE": "2",
        "SNARK_TINY_DIR": str(tmp_path / "unbuilt"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "benchmark_vlm.py", "--tiny", "--concurrency", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2 and "uv sync --extra vllm" in result.stderr
    assert not (tmp_path / "unbuilt").exists()  # refused before building anything


def test_prefix_caching_off_reaches_vllm_only_when_given(env):
    assert "enable_prefix_caching" not in engine_args(env(SNARK_ENGINE="vllm"))
    assert engine_args(env(SNARK_ENGINE="vllm", SNARK_PREFIX_CACHING="0"))["enable_prefix_caching"] is False
