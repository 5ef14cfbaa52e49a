"""Per-row sampling inside one batched ``generate`` call.

``generate`` applies one decoding strategy to the whole batch, but each request brings its own
temperature, top-p, top-k, seed and penalties. ``PerRowSampler`` runs as a logits processor under
greedy ``generate``: for every sampled row it draws the token itself (with that row's own
``torch.Generator``) and leaves a one-hot row, so greedy's argmax picks exactly that token; plain
greedy rows pass through untouched, so their output equals a one-at-a-time greedy run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from snark.engine.request import SamplingParams


class PerRowSampler:
    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompt_lengths: Sequence[int],
        *,
        device: torch.device,
        row_done: Callable[[int], bool] = lambda row: False,
    ) -> None:
        self.params = list(params)
        # Rows the tracker already ended keep being decoded until the batch ends; their tokens are
        # thrown away, so sampling them would be wasted work. (Flags are from the previous step.)
        self.row_done = row_done
        self.prompt_width = max(prompt_lengths)  # padded prompt length: ids past it are generated
        self.row_starts = [self.prompt_width - n for n in prompt_lengths]  # first non-pad position
        self.generators: list[torch.Generator | None] = []
        for p in self.params:
            if p.is_greedy:
                self.generators.append(None)
                continue
            generator = torch.Generator(device=device)
            generator.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: [batch, prompt_width + generated]; scores: [batch, vocab] float32
        for row, p in enumerate(self.params):
            if not p.needs_logits_processing or self.row_done(row):
                continue
            logits = scores[row]
            if p.repetition_penalty != 1.0:
                seen = input_ids[row, self.row_starts[row] :].unique()
                picked = logits[seen]
                logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:
                generated = input_ids[row, self.prompt_width :]
                if generated.numel():
                    counts = torch.bincount(generated, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)
                    logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if not p.is_greedy:
                token = self._sample(logits, p, self.generators[row])
                logits.fill_(float("-inf"))
                logits[token] = 0.0
        return scores

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())


def sampling_defaults(generation_config) -> SamplingParams:
    """The model's own recommended sampling (generation_config.json), used where a request is silent,
    as vLLM does. Qwen2.5-VL ships temperature 0.1 / top_k 1 (greedy in effect) and repetition 1.05."""
    g = generation_config
    do_sample = bool(getattr(g, "do_sample", False))
    return SamplingParams(
        temperature=float(g.temperature or 1.0) if do_sample else 0.0,
        top_p=float(g.top_p or 1.0) if do_sample else 1.0,
        top_k=int(g.top_k or 0) if do_sample else 0,
        repetition_penalty=float(getattr(g, "repetition_penalty", None) or 1.0),
    )
