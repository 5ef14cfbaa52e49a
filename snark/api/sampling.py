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
from snark.values import SamplingParams, StructuredOutput

MAX_STOP_STRINGS = 16  # as OpenAI


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of at most 16 strings."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(stops)} strings; send at most {MAX_STOP_STRINGS}.", param="stop")
    return stops


def refuse_stop_beside(structure: StructuredOutput | None, stops: tuple[str, ...], constrained_by: str) -> None:
    """A constrained answer ends where its schema ends, and a stop string could cut it short: refuse
    both together, naming what constrains it (``constrained_by``: the request's field names)."""
    if structure is not None and stops:
        cut = "the JSON or the call" if "tools" in constrained_by else "the JSON"
        raise InvalidRequest(
            f"stop cannot be combined with {constrained_by}: a stop string could cut {cut} short; the answer "
            "already ends where its schema ends.",
            param="stop",
            code="unsupported_parameter",
        )


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
