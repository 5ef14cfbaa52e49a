"""Snark's ``SamplingParams`` -> the fields of vLLM's ``SamplingParams``, without importing vLLM.

Every field a Snark route accepts has its vLLM counterpart with the same meaning: greedy below
Snark's greedy threshold (or top_k=1), HF-style repetition penalty over prompt and output,
OpenAI-style frequency/presence penalties over the output, stop strings cut from the answer,
end-of-turn ignored on request. Text is detokenized without special tokens, as Snark's own engine does.

Structured outputs travel as vLLM's own (``structured_outputs``, compiled by its xgrammar backend):
the grammar text Snark writes for a schema, and the same structural tag for tool calls, so both
engines constrain a request to the same grammar; a constrained row ends where its grammar ends.
"""

from __future__ import annotations

from typing import Any

from snark.structured.constraint import grammar_of
from snark.values import SamplingParams, StructuredOutput


def vllm_sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` (the caller adds ``output_kind``)."""
    greedy = params.is_greedy
    return {
        "n": 1,
        # vLLM generates at least one token: a prompt scored alone (0) runs one, which the engine drops
        # (``logprobs.read_completion``).
        "max_tokens": max(params.max_new_tokens, 1),
        # vLLM is greedy at temperature 0 and then ignores top_p/top_k; Snark's tiny temperatures and top_k=1
        # mean the same, so they travel as 0 instead of as a near-zero divisor.
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 0 if greedy or params.top_k <= 0 else params.top_k,  # vLLM: 0 = no top-k cut
        "seed": params.seed,
        "stop": list(params.stop),
        "repetition_penalty": params.repetition_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "ignore_eos": params.ignore_eos and params.structure is None,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "structured_outputs": None if params.structure is None else _structured(params.structure),
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
    }


def _structured(structure: StructuredOutput) -> dict[str, Any]:
    compiled = structure.compiled  # VllmEngine.prepare wrote it (vllm_structured_fields)
    if not isinstance(compiled, dict):
        raise TypeError(f"the request's output grammar was not prepared by the vLLM engine: {type(compiled).__name__}")
    return compiled


def vllm_structured_fields(structure: StructuredOutput) -> dict[str, Any]:
    """Keyword arguments for ``vllm.sampling_params.StructuredOutputsParams``: the grammar or structural
    tag Snark's own engine compiles too. Raises ``InvalidRequest`` for a schema xgrammar cannot take."""
    kind, text = grammar_of(structure)
    return {kind: text}
