"""Per-row sampling: each running row brings its own temperature, top-p, top-k, seed and penalties.

``next_tokens`` takes one decoding step's logits for every row and returns one token per row. Plain
greedy rows cost one batched ``argmax`` and nothing else, so a greedy row picks the same token
whatever its companions do. Rows with penalties or sampling go through their own ``RowSampler``,
which keeps the row's state on the device between steps: the ids it has seen (for the repetition
penalty) and how often it generated each (for frequency and presence penalties), updated by one
token per step instead of being recounted from the whole history. Penalties are applied to all
penalised rows at once (Qwen2.5-VL's own defaults ask for a repetition penalty, so on real weights
that is every row), with no host sync; only rows that sample draw one by one. Rows that ask for
log-probabilities get them from the distribution their token came from (``logprobs.py``); the
others pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from snark.engine.transformers.logprobs import Scored, score
from snark.values import SamplingParams


class RowSampler:
    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int], *, vocab_size: int, device: torch.device
    ) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)
        self.seen: torch.Tensor | None = None  # [vocab] bool: prompt and output ids (repetition penalty)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        self.counts: torch.Tensor | None = None  # [vocab] float: output ids (frequency/presence)
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token: int) -> None:
        """Record the token this row just produced."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def truncated(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """``logits`` ([vocab]) as a sampling row draws from them: divided by the temperature, tokens
    outside top-k and top-p at -inf."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``truncated`` logits ([vocab])."""
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator).item())


def apply_penalties(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """``logits`` ([rows, vocab] float32) with each row's repetition, frequency and presence
    penalties applied, all penalised rows in one go."""
    repeat = [row for row, s in enumerate(samplers) if s.seen is not None]
    if repeat:
        seen = torch.stack([s.seen for s in samplers if s.seen is not None])  # [penalised, vocab]
        factor = torch.tensor([samplers[row].params.repetition_penalty for row in repeat], device=logits.device)[
            :, None
        ]
        rows = logits[repeat]
        logits[repeat] = torch.where(seen, torch.where(rows > 0, rows / factor, rows * factor), rows)
    counted = [row for row, s in enumerate(samplers) if s.counts is not None]
    if counted:
        counts = torch.stack([s.counts for s in samplers if s.counts is not None])  # [penalised, vocab]
        frequency = torch.tensor([samplers[row].params.frequency_penalty for row in counted], device=logits.device)
        presence = torch.tensor([samplers[row].params.presence_penalty for row in counted], device=logits.device)
        logits[counted] -= frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


@dataclass
class StepTokens:
    """One step's token per row, and per row its ``Scored`` log-probabilities (None: not asked for)."""

    tokens: list[int]
    logprobs: list[Scored | None]


def next_tokens(
    logits: torch.Tensor, samplers: Sequence[RowSampler], *, constrain: Callable[[torch.Tensor], None] | None = None
) -> StepTokens:
    """One token per row from ``logits`` ([rows, vocab] float32); one host sync for greedy rows.
    ``constrain`` masks, in place, the tokens constrained rows may not take (after the penalties,
    so a penalty can never bring back a forbidden token). Rows whose params ask for logprobs get
    them from the logits they drew from: a greedy row's penalised and masked ones, a sampling row's
    ``truncated`` ones."""
    logits = apply_penalties(logits, samplers)
    if constrain is not None:
        constrain(logits)
    tokens = logits.argmax(-1).tolist()
    drawn_from: dict[int, torch.Tensor] = {}  # sampling rows that want logprobs: what they drew from
    for row, sampler in enumerate(samplers):
        if sampler.generator is not None:  # a sampling row: its own draw from its penalised logits
            row_logits = truncated(logits[row], sampler.params)
            tokens[row] = draw(row_logits, sampler.generator)
            if sampler.params.logprobs is not None:
                drawn_from[row] = row_logits
    logprobs: list[Scored | None] = [None] * len(samplers)
    wanted = [row for row, sampler in enumerate(samplers) if sampler.params.logprobs is not None]
    if wanted:
        rows = torch.stack([drawn_from[row] if row in drawn_from else logits[row] for row in wanted])
        top = [samplers[row].params.logprobs or 0 for row in wanted]
        for row, scored in zip(wanted, score(rows, [tokens[row] for row in wanted], top)):
            logprobs[row] = scored
    return StepTokens(tokens, logprobs)
