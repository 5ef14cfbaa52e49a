"""One row: a request's tokens, where their keys and values are, and what turns tokens into text.

A row's ``tokens`` are its prompt and then every token it generated. ``computed`` of them have keys
and values in the KV cache (in ``blocks``); each step computes the next few (a prefill chunk) or the
last one (a decode step), and once every token is computed the row samples its next one. A prompt
prefix found in the prefix cache counts as computed from the start; a row preempted for room starts
over at 0 and recomputes (mostly finding its own blocks again in the prefix cache).

``accept`` takes the row's newest token and decides whether the row goes on; every text delta goes
into the step's ``Outbox`` (one event-loop wake-up per step, not per row), with the log-probabilities
of the tokens whose text it carries (``logprobs.py``). Once its whole prompt is computed
(``prompt_computed``) the row hands over its prompt's log-probabilities, and a row that asked for no
tokens at all (``max_new_tokens=0``: a prompt to score) ends there.
"""

from __future__ import annotations

import hashlib

import torch

from snark.engine.request import GenerationRequest, Outbox, PromptInputs, RequestState, StreamEvent
from snark.engine.token_text import TokenTexts
from snark.engine.transformers.blocks import ImageSpan
from snark.engine.transformers.detokenize import IncrementalDetokenizer, StopMatcher
from snark.engine.transformers.grammar import RowGrammar
from snark.engine.transformers.logprobs import HeldLogprobs, Scored
from snark.engine.transformers.sampler import RowSampler
from snark.values import FinishReason, TokenLogprob


class Row:
    def __init__(
        self,
        request: GenerationRequest,
        *,
        tokenizer,
        eos_token_ids: frozenset[int],
        vocab_size: int,
        device,
        image_token_id: int,
        video_token_id: int,
        texts: TokenTexts | None = None,
    ) -> None:
        self.request = request
        self.eos_token_ids = eos_token_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(request.params.stop)
        params = request.params
        wants_logprobs = params.logprobs is not None or params.prompt_logprobs is not None
        # Token id -> text and bytes, for log-probabilities (the engine shares one cache between rows).
        self.texts = texts if texts is not None or not wants_logprobs else TokenTexts(tokenizer)
        self.held = HeldLogprobs() if params.logprobs is not None else None
        self.prompt_scores: list[TokenLogprob] = []  # prompt tokens 1, 2, ... (with params.prompt_logprobs)
        self.prompt_done = False  # its whole prompt has been computed once (``prompt_computed``)
        prompt = request.prompt
        self.sampler = RowSampler(request.params, prompt.input_ids, vocab_size=vocab_size, device=device)
        structure = request.params.structure
        self.grammar = RowGrammar.of(structure) if structure is not None else None
        self.tokens: list[int] = list(prompt.input_ids)
        self.prompt_tokens = len(self.tokens)
        self.max_tokens = self.prompt_tokens + request.params.max_new_tokens  # the most it may ever hold
        # Images and videos, in prompt order: each a run of placeholder tokens the vision tower fills.
        self.images = media_spans(prompt, image_token_id, video_token_id)
        self.computed = 0  # tokens whose keys and values are in the cache
        self.blocks: list[int] = []  # KV cache blocks, in token order
        self.keys: list[bytes] = []  # prefix-cache keys of its full, computed blocks
        self.looked_up = False  # the prefix cache was asked (at admission, again after a preemption)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.positions: torch.Tensor | None = None  # [3, prompt] M-RoPE positions, set by the runner
        self.rope_delta = 0  # after the prompt, token i sits at position i + rope_delta on all axes
        self.features: dict[int, torch.Tensor] = {}  # span index -> its vision features, while prefilling it

    @property
    def done(self) -> bool:
        return self.request.is_done

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the row can sample its next one."""
        return len(self.tokens) - self.computed

    @property
    def samples_tokens(self) -> bool:
        """False for a row that only scores its prompt (``max_new_tokens=0``)."""
        return self.request.params.max_new_tokens > 0

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's log-probabilities are asked for and not all computed yet: every prompt position
        must run (no cached prefix)."""
        return self.request.params.prompt_logprobs is not None and not self.prompt_done

    def add_prompt_scores(self, first: int, scored: list[Scored]) -> None:
        """Scores of prompt tokens ``first``, ``first + 1``, ... (the runner computes them in order)."""
        if first != len(self.prompt_scores) + 1:
            raise RuntimeError(f"prompt logprobs from token {first}, after {len(self.prompt_scores)} of them")
        assert self.texts is not None  # built for every row that asks for logprobs
        tokens = self.tokens[first : first + len(scored)]
        self.prompt_scores += [self.texts.entry(token, lp, top) for token, (lp, top) in zip(tokens, scored)]

    def prompt_computed(self, outbox: Outbox) -> None:
        """Every prompt token is in the cache (first called then; once per row): its prompt's
        logprobs go on the request, and a row that asked for no tokens ends."""
        if self.prompt_done or self.computed < self.prompt_tokens:
            return
        self.prompt_done = True
        if self.request.params.prompt_logprobs is not None:
            self.request.prompt_logprobs = [None, *self.prompt_scores]
        if not self.samples_tokens:
            self.end(FinishReason.LENGTH, outbox)

    def reset(self) -> None:
        """Preempted: its blocks went back to the pool; it recomputes from the start."""
        self.computed, self.blocks, self.keys, self.looked_up = 0, [], [], False
        self.features.clear()

    def accept(self, token: int, outbox: Outbox, now: float, scored: Scored | None = None) -> None:
        """Take the row's newest token (and its ``scored`` logprobs, when the row asked for them):
        stream its text, or end the row (end-of-turn, a stop string, its own ``max_new_tokens``)."""
        request = self.request
        if request.first_token_at is None:
            request.first_token_at = now
        request.completion_tokens += 1
        self.tokens.append(token)
        self.sampler.observe(token)
        if self.grammar is not None and not self.grammar.accept(token):
            request.fail(RuntimeError(f"the output grammar refused token {token}, which its own mask allowed"))
            return
        entry = None
        if self.held is not None and scored is not None and self.texts is not None:
            entry = self.texts.entry(token, *scored)
        if token in self.eos_token_ids and (not request.params.ignore_eos or self.grammar is not None):
            if entry is not None and self.held is not None:
                self.held.add(entry, "")
            self.end(FinishReason.STOP, outbox)  # a grammar's end is the answer's end, ignore_eos or not
            return
        decoded = self.detokenizer.push(token)
        text, stopped = self.stops.feed(decoded)
        logprobs: tuple[TokenLogprob, ...] = ()
        if entry is not None and self.held is not None:
            self.held.add(entry, decoded)
            logprobs = self.held.rest() if stopped else self.held.release(text)
        if text or logprobs:
            request.push(StreamEvent(text=text, logprobs=logprobs), outbox)
        if stopped:
            request.finish(FinishReason.STOP, outbox)
        elif request.completion_tokens >= request.params.max_new_tokens:
            self.end(FinishReason.LENGTH, outbox)

    def end(self, reason: FinishReason, outbox: Outbox) -> None:
        """Finish the row; text held back (a partial character, a possible stop string) goes out
        first, unless the client is gone."""
        if reason is not FinishReason.CANCELLED:
            tail, _ = self.stops.feed(self.detokenizer.flush())
            tail += self.stops.flush()
            logprobs = self.held.rest() if self.held is not None else ()
            if tail or logprobs:
                self.request.push(StreamEvent(text=tail, logprobs=logprobs), outbox)
        self.request.finish(reason, outbox)

    def start(self, now: float) -> None:
        """Its first step (not again after a preemption)."""
        if self.request.state is RequestState.WAITING:
            self.request.state = RequestState.RUNNING
            self.request.scheduled_at = now


def media_spans(prompt: PromptInputs, image_token_id: int, video_token_id: int) -> list[ImageSpan]:
    """Each image's and video's run of placeholder tokens in a prompt, in order, with its key."""
    keys = {
        image_token_id: _keys(prompt.image_keys, prompt.pixel_values, prompt.image_grid_thw),
        video_token_id: _keys(prompt.video_keys, prompt.pixel_values_videos, prompt.video_grid_thw),
    }
    seen = {image_token_id: 0, video_token_id: 0}
    ids, spans, index, n = prompt.input_ids, [], 0, len(prompt.input_ids)
    while index < n:
        token = ids[index]
        if token not in seen or seen[token] >= len(keys[token]):
            index += 1
            continue
        end = index
        while end < n and ids[end] == token:
            end += 1
        ordinal = seen[token]
        spans.append(
            ImageSpan(
                start=index,
                length=end - index,
                key=keys[token][ordinal],
                video=token == video_token_id,
                ordinal=ordinal,
            )
        )
        seen[token] += 1
        index = end
    return spans


def _keys(keys: tuple[bytes, ...], pixel_values: torch.Tensor | None, grids: torch.Tensor | None) -> tuple[bytes, ...]:
    """The prompt's keys for its images (or videos); for a prompt built without them, digests of
    each one's pixel values."""
    count = 0 if grids is None else int(grids.shape[0])
    if len(keys) == count:
        return keys
    if grids is None or pixel_values is None:
        raise ValueError(f"a prompt with {len(keys)} keys for {count} images or videos, and no pixels to digest")
    found, offset = [], 0
    for grid in grids.tolist():
        patches = pixel_values[offset : offset + grid[0] * grid[1] * grid[2]]
        offset += patches.shape[0]
        found.append(hashlib.sha256(str(grid).encode() + patches.contiguous().numpy().tobytes()).digest())
    return tuple(found)
