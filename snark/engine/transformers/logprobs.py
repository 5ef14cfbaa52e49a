"""Log-probabilities in Snark's engine: of each generated token, of each prompt token, and which
event reports them.

* **Generated tokens** (``SamplingParams.logprobs``): from the distribution the token was drawn
  from, after the penalties and the grammar mask, and for a sampling row after its temperature,
  top-k and top-p (vLLM's ``processed_logprobs``). ``score`` takes those rows' logits together: one
  ``log_softmax`` and one ``topk`` for every row that asked, nothing for the rows that did not.
* **Prompt tokens** (``SamplingParams.prompt_logprobs``): token ``t``'s logprob given tokens
  ``[0, t)``, from the raw logits at position ``t - 1``, computed chunk by chunk while the prompt is
  prefilled and, within a chunk, ``PROMPT_SLICE_TOKENS`` positions at a time, so the logits of a long
  prompt never exist at once (152k floats a position).
* **Which event**: ``HeldLogprobs`` keeps a token's entry until the text it produced goes out to the
  client; a token whose text the detokenizer holds back (part of a character) or the stop matcher
  holds back (maybe a stop string) goes out with the event that releases it. Tokens that produce no
  text (end-of-turn) and the tokens of a stop string go out with the answer's last event: every
  token the row generated has an entry, as vLLM reports them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from snark.values import TokenLogprob

Scored = tuple[float, tuple[tuple[int, float], ...]]  # a token's logprob, and the top (id, logprob), most likely first
PROMPT_SLICE_TOKENS = 256  # prompt positions whose logits exist at once: 256 x 152k floats = 156 MB


def score(logits: torch.Tensor, chosen: Sequence[int], top: Sequence[int]) -> list[Scored]:
    """Row ``i`` of ``logits`` ([rows, vocab] float32, the distribution token ``chosen[i]`` came from):
    that token's logprob and the ``top[i]`` most likely tokens. One host copy for all rows."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    index = torch.tensor(list(chosen), device=logits.device)[:, None]
    picked = logprobs.gather(1, index)  # [rows, 1]
    k = min(max(top), logprobs.shape[-1])
    if k == 0:
        return [(value, ()) for value in picked[:, 0].tolist()]
    values, ids = logprobs.topk(k, dim=-1)  # [rows, k], most likely first
    # Token ids are exact in float32 (below 2**24): values and ids travel to the host as one tensor.
    host = torch.cat([picked, values, ids.to(values.dtype)], dim=1).tolist()
    found: list[Scored] = []
    for row, wanted in zip(host, top):
        pairs = zip(row[1 + k : 1 + k + wanted], row[1 : 1 + wanted])
        found.append((row[0], tuple((int(token), value) for token, value in pairs)))
    return found


def score_prompt(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: Sequence[int], top: int
) -> list[Scored]:
    """The logprob of each token of ``targets`` given the positions before it: ``hidden`` ([targets,
    hidden]) holds the final hidden state of the position before each; ``logits_of`` maps hidden states
    to float32 logits. ``PROMPT_SLICE_TOKENS`` positions at a time."""
    found: list[Scored] = []
    for at in range(0, len(targets), PROMPT_SLICE_TOKENS):
        chunk = targets[at : at + PROMPT_SLICE_TOKENS]
        logits = logits_of(hidden[at : at + len(chunk)])  # [slice, vocab]
        found += score(logits, chunk, [top] * len(chunk))
    return found


class HeldLogprobs:
    """A row's generated-token entries, each kept until the text it produced has gone out.

    Offsets count characters of the detokenized answer (before stop strings are cut). A token is
    *placed* once the detokenizer has given its text: its entry waits for the answer's first
    ``end`` characters to be released, ``end`` being where its text ends."""

    def __init__(self) -> None:
        self._unplaced: list[TokenLogprob] = []  # tokens whose text the detokenizer still holds
        self._placed: deque[tuple[int, TokenLogprob]] = deque()  # (end offset, entry), in order
        self._decoded = 0  # characters the detokenizer has given
        self._released = 0  # characters sent to the client

    def add(self, entry: TokenLogprob, decoded: str) -> None:
        """A new token's entry, and the text the detokenizer gave for it (maybe ``""``: held back, or
        none at all); that text completes the tokens still unplaced too."""
        self._unplaced.append(entry)
        if decoded:
            self._decoded += len(decoded)
            self._placed.extend((self._decoded, held) for held in self._unplaced)
            self._unplaced = []

    def release(self, text: str) -> tuple[TokenLogprob, ...]:
        """``text`` goes out to the client: the entries whose text it completes."""
        self._released += len(text)
        out: list[TokenLogprob] = []
        while self._placed and self._placed[0][0] <= self._released:
            out.append(self._placed.popleft()[1])
        return tuple(out)

    def rest(self) -> tuple[TokenLogprob, ...]:
        """Every entry still held: the answer's last event carries them."""
        out = (*(entry for _, entry in self._placed), *self._unplaced)
        self._placed.clear()
        self._unplaced = []
        return out
