"""Per-row bookkeeping during one batched ``generate``: the bridge from decode steps to clients.

``generate`` calls a stopping criterion once per decoding step with every row's ids so far. The
``BatchTracker`` is that criterion: it takes each live row's newest token, detokenizes it, checks
end-of-turn, stop strings, the row's own ``max_new_tokens`` and its cancel flag, and sends each text
delta to its row's client at the end of the step (one ``Outbox``: one event-loop wake-up per step,
not one per row). It returns which rows are done, so ``generate`` pads them from
then on and stops when all are done. A finished or cancelled row therefore reaches its client at
the step it ends, never at the end of the batch. The tracker is the only judge of a row's end:
``generate`` itself is given no end-of-turn ids, so an ``ignore_eos`` row runs on past one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from snark.engine.detokenize import IncrementalDetokenizer, StopMatcher
from snark.engine.request import FinishReason, GenerationRequest, Outbox, RequestState, StreamEvent


class _Row:
    def __init__(self, request: GenerationRequest, tokenizer) -> None:
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(request.params.stop)

    @property
    def done(self) -> bool:
        return self.request.is_done  # padding rows of a compiled batch start done

    def emit(self, text: str, outbox: Outbox) -> None:
        if text:
            self.request.push(StreamEvent(text=text), outbox)

    def end(self, reason: FinishReason, outbox: Outbox) -> None:
        if reason is not FinishReason.CANCELLED:
            tail, _ = self.stops.feed(self.detokenizer.flush())
            self.emit(tail + self.stops.flush(), outbox)
        self.request.finish(reason, outbox)


class BatchTracker:
    def __init__(self, requests: Sequence[GenerationRequest], tokenizer, eos_token_ids: Sequence[int]) -> None:
        self.rows = [_Row(r, tokenizer) for r in requests]
        self.eos_token_ids = frozenset(eos_token_ids)
        now = time.perf_counter()
        for row in self.rows:
            if not row.done:
                row.request.state = RequestState.RUNNING
                row.request.scheduled_at = now

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()  # [batch]; one host sync per step
        now = time.perf_counter()
        outbox = Outbox()  # this step's events, sent together once every row is seen
        for row, token in zip(self.rows, newest):
            if row.done:
                continue
            request = row.request
            if request.cancel_requested:
                row.end(FinishReason.CANCELLED, outbox)
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            request.completion_tokens += 1
            if token in self.eos_token_ids and not request.params.ignore_eos:
                row.end(FinishReason.STOP, outbox)
                continue
            text, stopped = row.stops.feed(row.detokenizer.push(token))
            row.emit(text, outbox)
            if stopped:
                request.finish(FinishReason.STOP, outbox)
            elif request.completion_tokens >= request.params.max_new_tokens:
                row.end(FinishReason.LENGTH, outbox)
        outbox.flush()
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        """After ``generate`` returns: rows it stopped on its own (max length) end as ``length``."""
        outbox = Outbox()
        for row in self.rows:
            if not row.done:
                row.end(FinishReason.CANCELLED if row.request.cancel_requested else FinishReason.LENGTH, outbox)
        outbox.flush()
