"""Structured outputs: what a request's output must follow (a JSON schema, tool calls) and what the
model's text means (tool calls parsed out of it). Engine-independent: each engine compiles the
constraint its own way (``snark.engine.transformers.grammar``; vLLM's structured outputs)."""
