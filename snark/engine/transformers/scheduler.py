"""Who computes which tokens at each step: one plan for decodes and prefill chunks together.

Three lists: ``waiting`` requests (shared with the event loop: ``submit`` appends, ``cancel``
removes; guarded by the engine's lock), ``preempted`` rows (sent back for room, first to return)
and ``running`` rows, which belong to the generation thread alone. A running row is either
decoding (one token a step) or still prefilling its prompt, a chunk a step.

Each step (vLLM V1's unified scheduling):

1. every running row gets its tokens, oldest first: a decode token each, and prompt chunks from a
   budget of ``max_prefill_tokens`` prompt tokens a step. A row that needs a new KV block when
   none is free preempts the newest running row (its blocks go back; it recomputes later, mostly
   from the prefix cache), never failing with an out-of-memory;
2. then preempted rows and waiting requests join, first come first served, while the prefill
   budget, ``max_rows`` and free blocks allow. A joining row first takes the longest cached prefix
   of its prompt (prefix caching), so only the rest is prefilled.

A request that could not fit even alone is refused at submit, never left waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snark.engine.request import GenerationRequest
from snark.engine.transformers.blocks import BlockPool, block_keys, blocks_for
from snark.engine.transformers.rows import Row
from snark.errors import InvalidRequest, Overloaded


@dataclass
class Scheduled:
    row: Row
    tokens: int  # how many of the row's tokens this step computes, from ``row.computed``

    @property
    def samples(self) -> bool:
        """After this step every token the row has is computed: it samples its next one (unless it
        only scores its prompt)."""
        return self.row.computed + self.tokens == len(self.row.tokens) and self.row.samples_tokens


@dataclass
class StepPlan:
    rows: list[Scheduled]  # decoding and prefilling rows, in running order
    preempted: list[Row]  # rows sent back to wait for room at this step


class Scheduler:
    def __init__(
        self, *, max_rows: int, max_waiting: int, max_prefill_tokens: int, pool: BlockPool, block_size: int
    ) -> None:
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = pool
        self.block_size = block_size
        self.waiting: list[GenerationRequest] = []  # oldest first
        self.preempted: list[Row] = []  # oldest first; they go before any waiting request
        self.running: list[Row] = []  # oldest first
        self._next: Row | None = None  # the row built for waiting[0], kept until it joins

    @property
    def capacity_tokens(self) -> int:
        return (self.pool.num_blocks - 1) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def check_fits_alone(self, request: GenerationRequest) -> None:
        """Refuse a request that no amount of waiting would let in."""
        needed = request.prompt.num_tokens + request.params.max_new_tokens
        if self.blocks_for(needed) > self.pool.num_blocks - 1:
            raise InvalidRequest(
                f"This request needs KV cache room for {needed} tokens ({request.prompt.num_tokens} of prompt, "
                f"images included, plus max_tokens={request.params.max_new_tokens}), more than this server's "
                f"whole budget of {self.capacity_tokens} tokens (SNARK_KV_CACHE_GIB): lower max_tokens, "
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

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.preempted or self.running)

    # --- one step -------------------------------------------------------------------------------
    def schedule(self, make_row: Callable[[GenerationRequest], Row]) -> StepPlan:
        budget = self.max_prefill_tokens
        plan = StepPlan(rows=[], preempted=[])
        index = 0
        while index < len(self.running):
            row = self.running[index]
            tokens = 1 if row.remaining == 1 else min(row.remaining, budget)
            if tokens == 0:  # a prompt still prefilling, and no budget left this step
                index += 1
                continue
            if not self._reserve(row, tokens, plan):
                break  # the row itself had to go back
            if row.remaining > 1:
                budget -= tokens
            plan.rows.append(Scheduled(row, tokens))
            index += 1
        while budget > 0 and len(self.running) < self.max_rows and (joining := self._head(make_row)) is not None:
            if joining in plan.preempted:
                break  # sent back at this very step: it waits at least one step
            if not joining.looked_up:
                self._take_cached_prefix(joining)
            tokens = min(joining.remaining, budget)
            new_blocks = self.blocks_for(joining.computed + tokens) - len(joining.blocks)
            if not self.pool.can_take(new_blocks):
                self.pool.release(joining.blocks)  # not now: let go of the cached prefix until it can join
                joining.reset()
                break
            joining.blocks += self.pool.allocate(new_blocks)
            self._pop_head(joining)
            if joining.request.scheduled_at is None and not joining.scores_prompt:  # its first admission
                self.pool.queries += joining.prompt_tokens
                self.pool.hits += joining.cached_tokens
            self.running.append(joining)
            budget -= tokens
            plan.rows.append(Scheduled(joining, tokens))
        return plan

    def _reserve(self, row: Row, tokens: int, plan: StepPlan) -> bool:
        """Blocks for ``row``'s next ``tokens``; preempt the newest rows until they are free.
        False when ``row`` itself was the newest left."""
        needed = self.blocks_for(row.computed + tokens) - len(row.blocks)
        while not self.pool.can_take(needed):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is row:
                return False
        row.blocks += self.pool.allocate(needed)
        return True

    def _preempt(self, row: Row, plan: StepPlan) -> None:
        self.running.remove(row)
        self.pool.release(row.blocks)
        row.reset()
        self.preempted.append(row)
        self.preempted.sort(key=lambda r: r.request.arrived_at)
        plan.preempted.append(row)

    def _head(self, make_row: Callable[[GenerationRequest], Row]) -> Row | None:
        if self.preempted:
            return self.preempted[0]
        if not self.waiting:
            return None
        if self._next is None or self._next.request is not self.waiting[0]:
            self._next = make_row(self.waiting[0])
        return self._next

    def _pop_head(self, row: Row) -> None:
        if self.preempted and self.preempted[0] is row:
            self.preempted.pop(0)
        else:
            self.waiting.pop(0)
            self._next = None

    def _take_cached_prefix(self, row: Row) -> None:
        """Start ``row`` with the longest prefix of its tokens the cache holds. The block of its last
        token is always computed afresh: its logits are needed. A row that scores its prompt takes
        nothing from the cache: every prompt position's logits are needed."""
        row.looked_up = True
        if row.scores_prompt:
            return
        lookup = (len(row.tokens) - 1) // self.block_size * self.block_size
        salt = row.request.prompt.cache_salt
        keys = block_keys(row.tokens[:lookup], self.block_size, images=row.images, salt=salt)
        row.blocks = self.pool.find(keys)
        row.keys = keys[: len(row.blocks)]
        row.computed = len(row.blocks) * self.block_size
        row.cached_tokens = min(row.computed, row.prompt_tokens)

    # --- after a step ---------------------------------------------------------------------------
    def computed(self, scheduled: Scheduled) -> None:
        """``scheduled`` ran: its tokens are in the cache; blocks that became full join the prefix cache."""
        row = scheduled.row
        row.computed += scheduled.tokens
        full = row.computed // self.block_size
        if full > len(row.keys):
            parent = row.keys[-1] if row.keys else b""
            new = block_keys(
                row.tokens[: full * self.block_size],
                self.block_size,
                images=row.images,
                salt=row.request.prompt.cache_salt,
                first=len(row.keys),
                parent=parent,
            )
            for block, key in zip(row.blocks[len(row.keys) : full], new):
                self.pool.register(block, key)
            row.keys += new

    def retire(self) -> list[Row]:
        """Remove the rows that ended from the running rows and give their blocks back; return them."""
        gone = [row for row in self.running if row.done]
        if gone:
            self.running = [row for row in self.running if not row.done]
            for row in gone:
                self.pool.release(row.blocks)
                row.blocks = []
        for row in [r for r in self.preempted if r.done]:
            self.preempted.remove(row)
            gone.append(row)
        return gone

    def fail_rows(self, rows: list[Row]) -> None:
        """Rows whose step failed leave, their blocks back in the pool (their keys were never registered)."""
        for row in rows:
            if row in self.running:
                self.running.remove(row)
            self.pool.release(row.blocks)
            row.blocks = []
