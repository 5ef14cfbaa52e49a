"""vLLM's outputs in Snark's terms: log-probabilities as ``TokenLogprob``s, and prompts scored alone.

vLLM reports, per generated token, a dict ``token_id -> Logprob(logprob, rank, decoded_token)``: the
token it drew and its top-k (ranks 1..k; the drawn token also keeps its own rank), and per prompt
token the same (``RequestOutput.prompt_logprobs``, None for the first token). Snark keeps each
position's own token and its top-k in rank order, and takes each token's text and exact bytes from
the vocabulary (``snark.engine.token_text``), as its own engine does, rather than vLLM's
``decoded_token`` (vLLM rewrites the pieces of a split character and keeps no bytes). Both engines
report every token the answer generated, the end-of-turn token and a stop string's tokens included.

Which distribution: the engine runs with ``logprobs_mode="processed_logprobs"`` (``args.py``), the
one Snark's engine reports: after penalties and the grammar mask, and for sampling after temperature,
top-k and top-p.

vLLM cannot generate zero tokens: a request with ``max_new_tokens=0`` (a prompt to score) runs with
``max_tokens=1`` (``sampling.py``), and its one token is dropped here, as vLLM's own server does for
``echo`` with ``max_tokens=0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from snark.engine.request import GenerationRequest
from snark.engine.token_text import TokenTexts
from snark.values import TokenLogprob


@dataclass(frozen=True)
class Completion:
    """One of vLLM's outputs for a request (``RequestOutput``, delta mode), as Snark reads it."""

    token_ids: Sequence[int]
    text: str
    logprobs: tuple[TokenLogprob, ...]  # one per token of ``token_ids``, with SamplingParams.logprobs
    finish_reason: str  # vLLM's ("stop", "length", "abort"); "" before the last output


def read_completion(request: GenerationRequest, output: Any, texts: TokenTexts | None) -> Completion:
    """``output``'s new tokens, text and logprobs for ``request``; its prompt's logprobs go on the request
    (they come with the first output). A prompt scored alone reports no token."""
    completion = output.outputs[0]
    params = request.params
    if texts is not None and params.prompt_logprobs is not None and output.prompt_logprobs is not None:
        request.prompt_logprobs = prompt_entries(
            output.prompt_token_ids, output.prompt_logprobs, texts, params.prompt_logprobs
        )
    if params.max_new_tokens == 0:  # vLLM ran one token (its least): the request asked for none
        return Completion((), "", (), "length" if output.finished else "")
    entries: tuple[TokenLogprob, ...] = ()
    if texts is not None and params.logprobs is not None and completion.logprobs:
        entries = tuple(
            entry(token_id, position, texts, params.logprobs)
            for token_id, position in zip(completion.token_ids, completion.logprobs)
        )
    return Completion(completion.token_ids, completion.text, entries, completion.finish_reason or "")


def prompt_entries(
    token_ids: Sequence[int], positions: Iterable[Mapping[int, Any] | None], texts: TokenTexts, top: int
) -> list[TokenLogprob | None]:
    """vLLM's prompt logprobs (None for the first token) for the prompt ``token_ids``."""
    return [
        None if position is None else entry(token_id, position, texts, top)
        for token_id, position in zip(token_ids, positions)
    ]


def entry(token_id: int, position: Mapping[int, Any], texts: TokenTexts, top: int) -> TokenLogprob:
    """One position's dict (``token_id -> Logprob``) as a ``TokenLogprob`` for ``token_id``, with the ``top``
    most likely tokens (vLLM's ranks 1..top) in rank order."""
    ranked = sorted(
        (logprob.rank, index, logprob.logprob)
        for index, logprob in position.items()
        if logprob.rank is not None and logprob.rank <= top
    )
    pairs = tuple((index, value) for _, index, value in ranked[:top])
    return texts.entry(token_id, position[token_id].logprob, pairs)
