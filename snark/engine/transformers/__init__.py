"""Snark's own continuous-batching engine on a Hugging Face Qwen2.5-VL model."""

from snark.engine.transformers.engine import TransformersEngine

__all__ = ["TransformersEngine"]
