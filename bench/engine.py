"""The one place the benchmark names Snark's engine classes: the rest of the benchmark talks to the
interface (``snark.engine.base.Engine``), and only ``start_engine`` knows which engine it builds."""

from __future__ import annotations

from collections.abc import Callable

from snark.config import Settings
from snark.engine.base import Engine
from snark.engine.loader import LoadedModel
from snark.engine.transformers import TransformersEngine

__all__ = ["Engine", "start_engine", "start_vllm_engine"]


def start_engine(loader: Callable[[], LoadedModel], *, wait_s: float | None = None, **options) -> Engine:
    """A started engine over ``loader``'s model, ready to take requests (``options``: the engine's
    keyword settings, such as ``max_batch_size`` or ``max_prefill_tokens``)."""
    engine = TransformersEngine(loader, **options)
    engine.start()
    engine.wait_ready(wait_s)
    return engine


def start_vllm_engine(settings: Settings, *, wait_s: float | None = None) -> Engine:
    """The server's vLLM engine for ``settings`` (SNARK_ENGINE=vllm or a VLLM_* setting), started and
    ready: vLLM loads ``settings.model_id`` itself, with the server's mapping of every setting."""
    from snark.engine.build import build_engine

    engine = build_engine(settings)
    engine.start()
    engine.wait_ready(wait_s)
    return engine
