"""A request's sampling fields -> the engine's ``SamplingParams``: one rule for every route.

The form routes (``max_new_tokens``, ``temperature``) and chat (``max_tokens`` or
``max_completion_tokens``, ``top_p``, ``top_k``, ...) name their fields differently; both come here,
so the defaults and the token limit are decided in one place. What a request leaves out comes from
the model's generation config (``defaults``); the token count defaults to
SNARK_DEFAULT_MAX_NEW_TOKENS and is capped by SNARK_MAX_NEW_TOKENS_LIMIT.
"""

from __future__ import annotations

from snark.config import Settings
from snark.errors import InvalidRequest
from snark.values import SamplingParams


def resolve_sampling(
    settings: Settings,
    defaults: SamplingParams,
    *,
    max_new_tokens: int | None,
    param: str,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    **extra,
) -> SamplingParams:
    """A request's sampling fields -> engine parameters, for every route: ``defaults`` (the model's
    generation config) fill what the request left out, and the token limit is checked once here."""
    max_new = settings.default_max_new_tokens if max_new_tokens is None else max_new_tokens  # 0: score the prompt
    if max_new > settings.max_new_tokens_limit:
        raise InvalidRequest(
            f"{param}={max_new} is over this server's limit of {settings.max_new_tokens_limit} "
            "(SNARK_MAX_NEW_TOKENS_LIMIT): ask for fewer.",
            param=param,
        )
    temperature = defaults.temperature if temperature is None else temperature
    sampled = temperature > 0  # greedy ignores top_p / top_k, so they are normalised away
    top_k = defaults.top_k if top_k is None else max(top_k, 0)
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=(defaults.top_p if top_p is None else top_p) if sampled else 1.0,
        top_k=top_k if sampled else 0,
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
        **extra,
    )
