"""One typed ``Settings`` object, read from the environment and validated at start-up.

Every setting has an environment name (shown in the ``Field`` alias or ``SNARK_`` + the field name in
upper case); docs/configuration.md lists them all. Bad values raise ``ConfigError`` before any weight is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from snark.errors import ConfigError

# vLLM engine arguments Snark derives from its own settings: VLLM_ENGINE_ARGS may not set them, so
# each has one place (the setting named here). snark.engine.vllm.args does the deriving.
VLLM_DERIVED_ARGS = {
    "model": "VLM_MODEL or VLM_SIZE",
    "tokenizer": "VLM_MODEL or VLM_SIZE",
    "tensor_parallel_size": "VLLM_TP_SIZE",
    "pipeline_parallel_size": "VLLM_PP_SIZE",
    "distributed_executor_backend": "VLLM_DISTRIBUTED_BACKEND",
    "gpu_memory_utilization": "VLLM_GPU_MEM_UTILIZATION",
    "kv_cache_memory_bytes": "SNARK_KV_CACHE_GIB",
    "max_model_len": "VLLM_MAX_MODEL_LEN",
    "max_num_seqs": "VLLM_MAX_NUM_SEQS (or SNARK_MAX_BATCH_SIZE)",
    "enforce_eager": "VLLM_ENFORCE_EAGER",
    "enable_prefix_caching": "SNARK_PREFIX_CACHING",
    "limit_mm_per_prompt": "SNARK_MAX_IMAGES_PER_REQUEST and SNARK_MAX_VIDEOS_PER_REQUEST",
    "mm_processor_kwargs": "SNARK_MAX_IMAGE_PIXELS and SNARK_MAX_VIDEO_FRAME_PIXELS (Snark resizes the media itself)",
}

# Published Qwen2.5-VL instruct checkpoints. There is no 14B (Qwen2.5 has a 14B text model, the VL
# family does not), so VLM_SIZE=14B is refused with this list rather than a 404 from the hub.
VLM_SIZES = ("3B", "7B", "32B", "72B")
DEFAULT_TINY_DIR = Path.home() / ".cache" / "snark" / "tiny-qwen2.5-vl"


def model_id_for_size(size: str) -> str:
    """Map ``VLM_SIZE`` (case-insensitive, e.g. ``7b``) to its hub id, or raise ``ConfigError``."""
    normalised = size.strip().upper()
    if normalised not in VLM_SIZES:
        hint = " There is no Qwen2.5-VL-14B." if normalised == "14B" else ""
        raise ConfigError(
            f"VLM_SIZE={size!r} is not a Qwen2.5-VL size.{hint} Valid sizes: {', '.join(VLM_SIZES)}; "
            "or set VLM_MODEL to any hub id or local checkpoint folder "
            "(or run `snark serve --tiny` to try Snark offline)."
        )
    return f"Qwen/Qwen2.5-VL-{normalised}-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SNARK_", extra="ignore", populate_by_name=True)

    # --- model -------------------------------------------------------------------------------
    vlm_size: str = Field("7B", validation_alias=AliasChoices("VLM_SIZE", "vlm_size"))
    vlm_model: str | None = Field(None, validation_alias=AliasChoices("VLM_MODEL", "vlm_model"))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tiny_dir: Path = DEFAULT_TINY_DIR  # where `snark serve --tiny` builds its checkpoint

    # --- server ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8123, ge=1, le=65535)
    api_key: str | None = None  # one key, or several separated by commas
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)  # SIGTERM: running requests get this long, then are cancelled
    log_health_checks: bool = False  # uvicorn's access log leaves out GET /health unless this is set

    # --- generation --------------------------------------------------------------------------
    default_max_new_tokens: int = Field(256, gt=0)
    max_new_tokens_limit: int = Field(2048, gt=0)
    max_prompt_tokens: int = Field(32768, gt=0)
    max_n: int = Field(8, ge=1, le=128)  # choices one request may ask for (n): each is a row of its own
    max_batch_size: int = Field(16, ge=1, le=256)  # rows decoded together; 1: one request at a time
    batch_wait_ms: float = Field(0.0, ge=0)  # an idle engine waits this long for companions to its first prefill
    # Prompt tokens prefilled in one step, across prompts, beside every running row's decode token; longer
    # prompts go in chunks, so running rows never wait more than one chunk.
    max_prefill_tokens: int | None = Field(None, gt=0)  # default: 1024 on CPU, 2048 on CUDA
    kv_cache_gib: float | None = Field(None, gt=0)  # default: 4 on CPU, 80% of the GPU memory free after loading
    kv_block_size: int | None = Field(None, ge=1, le=4096)  # tokens a KV block; default 16 (256 with flash-attn)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before (images keyed by content)
    encoder_cache_mib: float = Field(512, ge=0)  # the vision tower's outputs kept for images seen again
    cuda_graphs: bool = True  # replay decode steps as captured CUDA graphs (CUDA with flash-attn only)
    max_waiting_requests: int = Field(64, ge=1)

    # --- structured outputs (JSON schema, tool calls) -----------------------------------------
    # Checked before any grammar is compiled: a compile cannot be interrupted once it runs.
    max_schema_bytes: int = Field(32 * 1024, gt=0)  # one response schema, or all tools' parameters together
    max_schema_depth: int = Field(16, ge=1)  # nesting of objects, arrays and combinators

    # --- images ------------------------------------------------------------------------------
    # Operator cap on the pixels an image is resized to before the vision tower (1280 * 28 * 28 is
    # 1280 image tokens); the published checkpoints allow up to 16384 * 28 * 28.
    max_image_pixels: int = Field(1280 * 28 * 28, ge=4 * 28 * 28, le=16384 * 28 * 28)
    min_image_pixels: int = Field(4 * 28 * 28, ge=4 * 28 * 28)
    # A chat image part's detail "low": resized within this many pixels (OpenAI's low detail is 512 x 512).
    low_detail_image_pixels: int = Field(512 * 512, ge=4 * 28 * 28)
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_source_pixels: int = Field(64_000_000, gt=0)  # decompression-bomb cap, checked before decoding
    max_images_per_request: int = Field(8, ge=1)
    image_url_timeout_s: float = Field(10.0, gt=0)
    image_url_max_redirects: int = Field(3, ge=0)
    allow_private_urls: bool = False  # image and video URLs alike

    # --- videos ------------------------------------------------------------------------------
    # Sampled as Qwen samples them (frames at video_fps, an even count, a pixel budget for the clip);
    # a request may lower these, never raise them.
    max_video_bytes: int = Field(
        64 * 1024 * 1024, gt=0
    )  # URL downloads; uploads and data: URIs also meet max_body_bytes
    video_url_timeout_s: float = Field(60.0, gt=0)
    max_videos_per_request: int = Field(2, ge=1)
    max_video_seconds: float = Field(
        3600.0, gt=0
    )  # longer clips are refused (a part can be asked for with video_start/end)
    max_video_source_pixels: int = Field(8192 * 4320, gt=0)  # one frame as stored; 8K
    video_decode_timeout_s: float = Field(60.0, gt=0)  # one video's decoding, checked between frames
    video_fps: float = Field(2.0, gt=0, le=60)  # frames sampled a second, by default
    max_video_frames: int = Field(768, ge=2, le=768)  # frames sampled from one video, at most
    min_video_frame_pixels: int = Field(128 * 28 * 28, ge=28 * 28)
    max_video_frame_pixels: int = Field(768 * 28 * 28, ge=28 * 28, le=16384 * 28 * 28)
    max_video_tokens: int = Field(16384, ge=1)  # one video's prompt tokens (its frames' pixel budget / 784)

    # --- speech ------------------------------------------------------------------------------
    tts_engine: Literal["piper", "coqui"] = "piper"
    tts_voice: str | None = None  # piper: path to a .onnx voice (default: the bundled joe voice)
    tts_voices: str | None = None  # more Piper voices by name: "name=/path/a.onnx,other=/path/b.onnx"
    tts_workers: int | None = Field(None, ge=1, le=64)  # syntheses at once; default: half the cores, 2 to 8
    tts_threads: int = Field(1, ge=1, le=64)  # ONNX threads per synthesis (Piper)
    coqui_model: str = "tts_models/en/ljspeech/vits"

    # --- engine: Snark's own (transformers) or vLLM ------------------------------------------
    # auto: vLLM when one of the VLLM_* settings below is given (vLLM's own variables, such as
    # VLLM_CPU_KVCACHE_SPACE, do not count), else transformers. The VLLM_* names are Snark's.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_tp_size: int | None = Field(None, ge=1, validation_alias=AliasChoices("VLLM_TP_SIZE", "vllm_tp_size"))
    vllm_pp_size: int | None = Field(None, ge=1, validation_alias=AliasChoices("VLLM_PP_SIZE", "vllm_pp_size"))
    vllm_gpu_mem_utilization: float | None = Field(
        None, gt=0, le=1, validation_alias=AliasChoices("VLLM_GPU_MEM_UTILIZATION", "vllm_gpu_mem_utilization")
    )
    vllm_max_model_len: int | None = Field(
        None, ge=2, validation_alias=AliasChoices("VLLM_MAX_MODEL_LEN", "vllm_max_model_len")
    )
    vllm_max_num_seqs: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("VLLM_MAX_NUM_SEQS", "vllm_max_num_seqs")
    )
    vllm_enforce_eager: bool | None = Field(
        None, validation_alias=AliasChoices("VLLM_ENFORCE_EAGER", "vllm_enforce_eager")
    )
    vllm_distributed_backend: Literal["mp", "ray"] | None = Field(
        None, validation_alias=AliasChoices("VLLM_DISTRIBUTED_BACKEND", "vllm_distributed_backend")
    )
    # Any other AsyncEngineArgs field, as a JSON object: '{"dtype": "float16", "max_num_batched_tokens": 8192}'.
    vllm_engine_args: str | None = Field(None, validation_alias=AliasChoices("VLLM_ENGINE_ARGS", "vllm_engine_args"))

    @field_validator("vlm_size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        try:
            model_id_for_size(value)
        except ConfigError as exc:  # pydantic wraps ValueError into a ValidationError
            raise ValueError(str(exc)) from exc
        return value.strip().upper()

    @field_validator("vllm_engine_args")
    @classmethod
    def _json_object(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'VLLM_ENGINE_ARGS is not valid JSON ({exc}): give an object such as \'{{"dtype": "float16"}}\'.'
            ) from None
        if not isinstance(parsed, dict):
            raise ValueError(
                'VLLM_ENGINE_ARGS must be a JSON object of engine arguments, such as \'{"dtype": "float16"}\'.'
            )
        return value

    @field_validator("tts_voices")
    @classmethod
    def _voice_pairs(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_voice_pairs(value)
        return value

    @model_validator(mode="after")
    def _one_engine(self) -> Settings:
        given = self.vllm_settings_given
        if self.engine == "transformers" and given:
            raise ValueError(
                f"SNARK_ENGINE=transformers, but {', '.join(given)} only apply to the vLLM engine: "
                "unset them, or use SNARK_ENGINE=vllm (or auto)."
            )
        if self.engine_name == "vllm":
            self._check_vllm_overlaps()
        return self

    def _check_vllm_overlaps(self) -> None:
        """Raise ``ValueError`` for settings that both size or set the same thing on the vLLM engine."""
        s = self
        if (
            s.vllm_max_num_seqs is not None
            and "max_batch_size" in s.model_fields_set
            and s.max_batch_size != s.vllm_max_num_seqs
        ):
            raise ValueError(
                f"SNARK_MAX_BATCH_SIZE={s.max_batch_size} and VLLM_MAX_NUM_SEQS={s.vllm_max_num_seqs} disagree: on the "
                "vLLM engine both mean the rows decoded together; give one of them."
            )
        if s.kv_cache_gib is not None and s.vllm_gpu_mem_utilization is not None:
            raise ValueError(
                "SNARK_KV_CACHE_GIB (the KV cache size) and VLLM_GPU_MEM_UTILIZATION (a memory fraction) both size "
                "vLLM's KV cache, and vLLM would ignore the fraction: give one of them."
            )
        clashes = sorted(set(s.vllm_extra_engine_args) & set(VLLM_DERIVED_ARGS))
        if clashes:
            where = "; ".join(f"{key}: {VLLM_DERIVED_ARGS[key]}" for key in clashes)
            raise ValueError(
                f"VLLM_ENGINE_ARGS may not set {', '.join(clashes)}: Snark sets them from its settings ({where})."
            )

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"SNARK_DEFAULT_MAX_NEW_TOKENS ({self.default_max_new_tokens}) exceeds "
                f"SNARK_MAX_NEW_TOKENS_LIMIT ({self.max_new_tokens_limit})."
            )
        if self.min_image_pixels > self.max_image_pixels:
            raise ValueError("SNARK_MIN_IMAGE_PIXELS must not exceed SNARK_MAX_IMAGE_PIXELS.")
        if self.min_video_frame_pixels > self.max_video_frame_pixels:
            raise ValueError("SNARK_MIN_VIDEO_FRAME_PIXELS must not exceed SNARK_MAX_VIDEO_FRAME_PIXELS.")
        return self

    @property
    def model_id(self) -> str:
        """What to load: ``VLM_MODEL`` when set, else the hub id for ``VLM_SIZE``."""
        return self.vlm_model or model_id_for_size(self.vlm_size)

    @property
    def vllm_settings_given(self) -> list[str]:
        """The env names of the VLLM_* settings that were given."""
        return [
            env_name(name)
            for name in Settings.model_fields
            if name.startswith("vllm_") and getattr(self, name) is not None
        ]

    @property
    def engine_name(self) -> Literal["transformers", "vllm"]:
        """SNARK_ENGINE, with auto resolved: vLLM when a VLLM_* setting is given."""
        if self.engine != "auto":
            return self.engine
        return "vllm" if self.vllm_settings_given else "transformers"

    @property
    def vllm_extra_engine_args(self) -> dict[str, Any]:
        return json.loads(self.vllm_engine_args) if self.vllm_engine_args else {}

    @property
    def encoder_cache_bytes(self) -> int:
        return int(self.encoder_cache_mib * 1024**2)

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_gib is None else int(self.kv_cache_gib * 1024**3)

    @property
    def tts_voice_paths(self) -> dict[str, str]:
        """SNARK_TTS_VOICES as {name: path}."""
        return _parse_voice_pairs(self.tts_voices) if self.tts_voices else {}

    @property
    def api_keys(self) -> tuple[str, ...]:
        if not self.api_key:
            return ()
        return tuple(key.strip() for key in self.api_key.split(",") if key.strip())


def _parse_voice_pairs(value: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, path = (text.strip() for text in item.partition("="))
        if not sep or not name or not path:
            raise ValueError(
                f"SNARK_TTS_VOICES entry {item!r} is not name=path: "
                "give e.g. 'amy=/voices/en_US-amy-medium.onnx,joe=/voices/joe.onnx'."
            )
        pairs[name] = path
    return pairs


def env_name(field_name: str) -> str:
    """The environment variable a setting is read from: its alias (``VLM_SIZE``) or ``SNARK_`` + its name."""
    alias = Settings.model_fields[field_name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return "SNARK_" + field_name.upper()


_SECRET_SETTINGS = frozenset({"api_key"})  # their values never appear in a message


def load_settings(*, sources: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from the environment (``overrides`` win), turning validation errors into
    ``ConfigError`` naming where each bad value came from: the environment variable, or for an
    override the name in ``sources`` (the CLI passes its flags: ``{"port": "--port"}``)."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, sources or {}) for err in exc.errors())
        raise ConfigError(f"Invalid Snark settings: {problems}") from exc


def _field_named(loc_head: object) -> str | None:
    """The field an error's location names: pydantic reports a field read through an alias
    (``VLM_SIZE``) under that alias."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if loc_head == name or (isinstance(alias, AliasChoices) and loc_head in alias.choices):
            return name
    return None


def _describe(err: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    field = _field_named(err["loc"][0]) if err["loc"] else None
    if field is None:  # a rule across settings: its message names them
        return message
    name = sources.get(field) or env_name(field)
    if message.startswith(name):  # the validator's own message already says which setting
        return message
    if field in _SECRET_SETTINGS:
        return f"{name}: {message}"
    return f"{name}={err['input']!r}: {message}"
