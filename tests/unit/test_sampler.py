"""The per-row sampler on its own: penalties applied to all rows at once equal each row's own, and
greedy rows are untouched by their neighbours' sampling."""

from __future__ import annotations

import torch

from snark.engine.transformers.sampler import RowSampler, apply_penalties, next_tokens
from snark.values import SamplingParams

VOCAB = 50


def _sampler(params: SamplingParams, prompt: list[int], outputs: list[int]) -> RowSampler:
    sampler = RowSampler(params, prompt, vocab_size=VOCAB, device=torch.device("cpu"))
    for token in outputs:
        sampler.observe(token)
    return sampler


def _reference(logits: torch.Tensor, params: SamplingParams, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """The textbook definitions, one row at a time."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        for token in set(prompt + outputs):
            value = logits[token]
            logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(outputs):
        logits[token] -= params.frequency_penalty * outputs.count(token) + params.presence_penalty
    return logits


def test_batched_penalties_equal_each_rows_own():
    torch.manual_seed(0)
    rows = [
        (SamplingParams(repetition_penalty=1.3), [1, 2, 3], [4, 4, 5]),
        (SamplingParams(), [1, 2], [7]),  # no penalty: untouched
        (SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [9], [3, 3, 3, 8]),
        (SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0), [10, 11], [11, 12]),
    ]
    logits = torch.randn(len(rows), VOCAB) * 3
    expected = torch.stack([_reference(logits[i], *row) for i, row in enumerate(rows)])
    got = apply_penalties(logits.clone(), [_sampler(*row) for row in rows])
    torch.testing.assert_close(got, expected)


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat_their_draws():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=2.0, seed=42)
    first = next_tokens(
        logits.clone(), [_sampler(greedy, [1], []), _sampler(sampled, [1], []), _sampler(greedy, [2], [])]
    )
    again = next_tokens(
        logits.clone(), [_sampler(greedy, [1], []), _sampler(sampled, [1], []), _sampler(greedy, [2], [])]
    )
    assert first.tokens == again.tokens
    assert first.tokens[0] == int(logits[0].argmax()) and first.tokens[2] == int(logits[2].argmax())
    assert first.logprobs == [None, None, None]  # none asked for them
