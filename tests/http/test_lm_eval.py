"""lm-evaluation-harness scores answers against Snark, as evaluations of a served model do.

lm-eval's ``local-completions`` model sends each (context, continuation) pair to ``/v1/completions`` as
token ids with ``echo``, ``logprobs=1`` and ``max_tokens=1``, and adds up the continuation's prompt
log-probabilities. Its scores must be the ones Snark reports for the same tokens (``max_tokens=0``,
scoring only), and finite. The tiny model's weights are random, so the numbers mean nothing; that they
agree, token for token, is what is tested.
"""

from __future__ import annotations

import math

import httpx
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

PAIRS = [
    ("Question: what colour is the sky?\nAnswer:", " blue"),
    ("Question: what colour is the sky?\nAnswer:", " green with purple stripes"),
    ("The capital of France is", " Paris"),
]


def snark_score(http: httpx.Client, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-probability and whether greedy decoding would write it, from Snark's own answer."""
    whole = http.post("/tokenize", json={"prompt": context + continuation}).json()["tokens"]
    start = len(http.post("/tokenize", json={"prompt": context}).json()["tokens"])
    body = {"model": "snark", "prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 1}
    logprobs = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    scored = logprobs["token_logprobs"][start:]
    greedy = all(lp == max(top.values()) for lp, top in zip(scored, logprobs["top_logprobs"][start:]))
    return sum(scored), greedy


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lm_eval_loglikelihood_matches_snarks_prompt_logprobs(base_url: str, tiny_model_dir: str, batch_size: int):
    lm = LocalCompletionsAPI(
        base_url=f"{base_url}/v1/completions",
        model="snark",
        tokenizer_backend="huggingface",
        tokenizer=tiny_model_dir,
        batch_size=batch_size,  # 2: several prompts in one request
        max_retries=1,
    )
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=index) for index, pair in enumerate(PAIRS)
    ]
    scores = lm.loglikelihood(requests)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        expected = [snark_score(http, *pair) for pair in PAIRS]
    assert len(scores) == len(PAIRS)
    for (logprob, greedy), (snark_logprob, snark_greedy) in zip(scores, expected):
        assert math.isfinite(logprob) and logprob < 0
        assert logprob == pytest.approx(snark_logprob, abs=1e-4) and greedy == snark_greedy
