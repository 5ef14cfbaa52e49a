"""One running row: a request's place in the running batch between its prefill and its end.

A ``Row`` holds what the loop needs to feed the row's next step (its last token and its next rope
position) and what turns tokens into the client's text: an incremental detokenizer, a stop-string
matcher and its sampler. ``accept`` takes the row's newest token and decides whether the row goes
on; every text delta goes into the step's ``Outbox`` (one event-loop wake-up per step, not per row).
"""

from __future__ import annotations

from snark.engine.request import FinishReason, GenerationRequest, Outbox, RequestState, StreamEvent
from snark.engine.transformers.cache import Joining
from snark.engine.transformers.detokenize import IncrementalDetokenizer, StopMatcher
from snark.engine.transformers.grammar import RowGrammar
from snark.engine.transformers.sampler import RowSampler


class Row:
    def __init__(self, request: GenerationRequest, *, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, device,
                 now: float) -> None:  # fmt: skip
        self.request = request
        self.eos_token_ids = eos_token_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(request.params.stop)
        self.sampler = RowSampler(request.params, request.prompt.input_ids, vocab_size=vocab_size, device=device)
        structure = request.params.structure
        self.grammar = RowGrammar(structure.compiled) if structure is not None else None
        self.joining = joining(request)
        self.last_token = -1  # the token the next decode step feeds
        self.next_position = 0  # its rope position (all three M-RoPE axes: text continues 1-D)
        request.state = RequestState.RUNNING
        request.scheduled_at = now  # the same instant for every row that joins at one step

    @property
    def done(self) -> bool:
        return self.request.is_done

    def accept(self, token: int, outbox: Outbox, now: float) -> None:
        """Take the row's newest token: stream its text, or end the row (end-of-turn, a stop string,
        its own ``max_new_tokens``)."""
        request = self.request
        if request.first_token_at is None:
            request.first_token_at = now
        request.completion_tokens += 1
        self.last_token = token
        self.sampler.observe(token)
        if self.grammar is not None and not self.grammar.accept(token):
            request.fail(RuntimeError(f"the output grammar refused token {token}, which its own mask allowed"))
            return
        if token in self.eos_token_ids and (not request.params.ignore_eos or self.grammar is not None):
            self.end(FinishReason.STOP, outbox)  # a grammar's end is the answer's end, ignore_eos or not
            return
        text, stopped = self.stops.feed(self.detokenizer.push(token))
        if text:
            request.push(StreamEvent(text=text), outbox)
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
            if tail:
                self.request.push(StreamEvent(text=tail), outbox)
        self.request.finish(reason, outbox)


def joining(request: GenerationRequest) -> Joining:
    """The cache room ``request`` may take: its prompt and every token it may generate."""
    prompt = request.prompt.num_tokens
    return Joining(prompt_tokens=prompt, total_tokens=prompt + request.params.max_new_tokens)
