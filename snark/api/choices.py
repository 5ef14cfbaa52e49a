"""Several choices for one prompt (``n``), and several prompts in one request: one engine row each.

    choice 0 of each prompt ──► submit ──► (Snark's engine) its first event: the prompt's KV blocks
                                            are in the prefix cache ──► submit choices 1..n-1,
                                            which take them from there instead of prefilling again

The prompt is prefilled once: on vLLM, whose prefix cache takes a block as soon as a step schedules
it, every choice is submitted at once. Each choice samples on its own; with a ``seed``, choice i uses
``seed + i``, so every choice is repeatable. A constrained answer's grammar was compiled once
(``Engine.prepare``); each choice's row follows it with a matcher of its own. The prompt's
log-probabilities (``echo`` with ``logprobs``) are the same for every choice, so only choice 0
computes them, and the others keep using the prefix cache.

Every submission happens before an answer starts, so a full queue is a 503 for the whole request. A
client that leaves, a timeout, or a choice that fails cancels every choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from snark.engine.base import Engine
from snark.engine.request import GenerationRequest, PromptInputs, StreamEvent
from snark.values import SamplingParams

_SEEDS = 2**64  # seeds are unsigned 64-bit numbers; seed + i wraps past the largest


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice: choice i samples with ``seed + i``; only choice 0 scores the prompt."""
    out = [params]
    for i in range(1, n):
        seed = None if params.seed is None else params.seed + i
        if seed is not None and seed >= _SEEDS:
            seed -= _SEEDS
        out.append(dataclasses.replace(params, seed=seed, prompt_logprobs=None))
    return out


class Choice:
    """One choice: its engine request and its events (the first one may have been read already, to
    learn that the prompt was prefilled)."""

    def __init__(
        self, index: int, prompt_index: int, generation: GenerationRequest, events: AsyncGenerator[StreamEvent, None]
    ) -> None:
        self.index = index  # prompt_index * n + i, as OpenAI numbers them
        self.prompt_index = prompt_index
        self.generation = generation
        self._events = events
        self._first: StreamEvent | None = None

    async def wait_started(self) -> None:
        """Until the choice's first event: its prompt has been prefilled (or it ended)."""
        self._first = await anext(self._events)

    async def close(self, engine: Engine) -> None:
        """Cancel the choice and end its events unread."""
        engine.cancel(self.generation)
        with contextlib.suppress(Exception):
            await self._events.aclose()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The choice's events up to its final one; closing this cancels the choice."""
        async with contextlib.aclosing(self._events):
            if self._first is not None:
                first, self._first = self._first, None
                yield first
                if first.is_final:
                    return
            async for event in self._events:
                yield event


class Choices:
    """Every choice of one request, in ``index`` order."""

    def __init__(self, engine: Engine, choices: list[Choice], prompts: Sequence[PromptInputs], n: int) -> None:
        self.engine = engine
        self.choices = sorted(choices, key=lambda choice: choice.index)
        self.prompts = prompts
        self.n = n

    @classmethod
    async def start(
        cls, engine: Engine, prompts: Sequence[PromptInputs], params: SamplingParams, n: int, *, stream: bool
    ) -> Choices:
        """Submit ``n`` choices of each prompt. Raises what ``engine.submit`` raises (503 for a full
        queue), with every choice submitted so far cancelled."""
        per_choice = choice_params(params, n)
        follow_first = n > 1 and not engine.shares_prefill_when_submitted_together
        submitted: list[Choice] = []

        def submit(prompt_index: int, i: int, deliver_deltas: bool) -> Choice:
            generation = engine.submit(prompts[prompt_index], per_choice[i], deliver_deltas=deliver_deltas)
            choice = Choice(prompt_index * n + i, prompt_index, generation, engine.follow(generation))
            submitted.append(choice)
            return choice

        async def followers(first: Choice) -> None:
            if follow_first:
                await first.wait_started()
            for i in range(1, n):
                submit(first.prompt_index, i, stream)

        tasks: list[asyncio.Future] = []
        try:
            # The first choice of a prompt that others follow sends its events: the first one says when.
            firsts = [submit(index, 0, stream or follow_first) for index in range(len(prompts))]
            tasks = [asyncio.ensure_future(followers(first)) for first in firsts]
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for choice in submitted:
                await choice.close(engine)
            raise
        return cls(engine, submitted, prompts, n)

    @property
    def generations(self) -> list[GenerationRequest]:
        return [choice.generation for choice in self.choices]

    @property
    def prompt_tokens(self) -> int:
        return sum(prompt.num_tokens for prompt in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(generation.completion_tokens for generation in self.generations)

    def first_of(self, choice: Choice) -> GenerationRequest:
        """The request that scored ``choice``'s prompt (choice 0 of the same prompt)."""
        return self.choices[choice.prompt_index * self.n].generation

    def cancel(self) -> None:
        for generation in self.generations:
            self.engine.cancel(generation)

    async def finished(self) -> list[GenerationRequest]:
        """Wait for every choice to end; their requests hold the answers. Cancelled, or a failing
        choice, cancels them all."""
        tasks = [asyncio.ensure_future(_drain(choice)) for choice in self.choices]
        try:
            await asyncio.gather(*tasks)
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.generations

    async def events(self) -> AsyncIterator[tuple[Choice, StreamEvent]]:
        """Every choice's events as they come, interleaved (each choice's in order); closing this
        cancels every choice."""
        if len(self.choices) == 1:
            choice = self.choices[0]
            async for event in choice.events():
                yield choice, event
            return
        queue: asyncio.Queue[tuple[Choice, StreamEvent | BaseException | None]] = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(choice, queue)) for choice in self.choices]
        try:
            running = len(pumps)
            while running:
                choice, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield choice, item
        finally:
            self.cancel()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _drain(choice: Choice) -> None:
    async for _ in choice.events():
        pass


async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
    try:
        async for event in choice.events():
            queue.put_nowait((choice, event))
    except Exception as exc:
        queue.put_nowait((choice, exc))
    queue.put_nowait((choice, None))
