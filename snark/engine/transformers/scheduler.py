"""Waiting requests and running rows, and who joins the running batch at each step.

The waiting list is shared with the event loop (``submit`` appends, ``cancel`` removes) and guarded
by the engine's lock; the running rows belong to the generation thread alone. A request joins when
it fits: a free row (``max_rows``) and room in the KV cache budget for its prompt and every token it
may generate. A request that could not fit even alone is refused at submit, never left waiting.
"""

from __future__ import annotations

from snark.engine.request import GenerationRequest
from snark.engine.transformers.batching import plan_prefill
from snark.engine.transformers.cache import RowCache
from snark.engine.transformers.rows import Row, joining
from snark.errors import InvalidRequest, Overloaded


class Scheduler:
    def __init__(self, *, max_rows: int, max_waiting: int, max_prefill_tokens: int) -> None:
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: list[GenerationRequest] = []  # oldest first
        self.running: list[Row] = []  # in KV cache slot order

    def check_fits_alone(self, request: GenerationRequest, cache: RowCache) -> None:
        """Refuse a request that no amount of waiting would let in."""
        needed = joining(request).total_tokens
        if needed > cache.budget_tokens:
            raise InvalidRequest(
                f"This request needs KV cache room for {needed} tokens ({request.prompt.num_tokens} of prompt, "
                f"images included, plus max_tokens={request.params.max_new_tokens}), more than this server's "
                f"whole budget of {cache.budget_tokens} tokens (SNARK_KV_CACHE_GIB): lower max_tokens, "
                "shorten the prompt or send smaller images.",
                code="context_length_exceeded",
            )

    def add(self, request: GenerationRequest) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(
                f"{len(self.waiting)} requests are already waiting (SNARK_MAX_WAITING_REQUESTS); retry shortly.",
                retry_after_s=1,
            )
        self.waiting.append(request)

    def remove_waiting(self, request: GenerationRequest) -> bool:
        if request in self.waiting:
            self.waiting.remove(request)
            return True
        return False

    def drop_cancelled(self) -> None:
        """Waiting requests whose client left: they leave without running."""
        for request in [r for r in self.waiting if r.cancel_requested]:
            self.waiting.remove(request)
            request.drop()

    def admit(self, cache: RowCache) -> list[GenerationRequest]:
        """Take the oldest waiting requests that join at this step (possibly none)."""
        waiting = self.waiting
        count = plan_prefill(
            [r.prompt.num_tokens for r in waiting],
            max_prefill_tokens=self.max_prefill_tokens,
            fits=lambda n: cache.fits([joining(r) for r in waiting[:n]]),
        )
        admitted, self.waiting = waiting[:count], waiting[count:]
        return admitted

    def retire(self, cache: RowCache) -> list[Row]:
        """Remove the rows that ended from the batch and the cache; return them."""
        ended = [i for i, row in enumerate(self.running) if row.done]
        if not ended:
            return []
        cache.remove(ended)
        gone = [self.running[i] for i in ended]
        self.running = [row for row in self.running if not row.done]
        return gone
