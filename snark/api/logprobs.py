"""Log-probabilities in OpenAI's chat shape: ``choices[i].logprobs``, whole or per streamed chunk.

    "logprobs": {"content": [{"token": "Hel", "logprob": -0.31, "bytes": [72, 101, 108],
                              "top_logprobs": [{"token": "Hel", "logprob": -0.31, "bytes": [...]}, ...]}],
                 "refusal": null}

``bytes`` are the token's exact bytes (a token may hold part of a UTF-8 character: join the bytes of
consecutive tokens to read it); ``token`` is those bytes as text, a piece of a character read as
U+FFFD. A logprob of minus infinity (a token the grammar or top-k/top-p ruled out) is sent as
-9999.0, as OpenAI and vLLM do: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from snark.values import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's limit
FLOOR = -9999.0


def _value(logprob: float) -> float:
    return FLOOR if math.isnan(logprob) else max(logprob, FLOOR)


def content_entry(entry: TokenLogprob) -> dict:
    """One token of ``logprobs.content``, with its ``top_logprobs``."""
    return {
        "token": entry.token,
        "logprob": _value(entry.logprob),
        "bytes": list(entry.token_bytes),
        "top_logprobs": [
            {"token": token, "logprob": _value(value), "bytes": list(token.encode())} for _, token, value in entry.top
        ],
    }


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict:
    """A choice's (or a chunk's) ``logprobs`` object."""
    return {"content": [content_entry(entry) for entry in entries], "refusal": None}
