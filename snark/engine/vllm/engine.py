"""vLLM's async engine behind Snark's engine seam: tensor/pipeline parallel, Ray multi-node.

    submit() ──► a task on the server's event loop: AsyncLLM.generate(ids + images/videos, SamplingParams)
                                                    each delta ──► GenerationRequest.push ──► the route
    vLLM's output handler (same loop) ◄── zmq ◄── vLLM's engine core (its own process: scheduler, model)

vLLM runs in-process through ``AsyncLLM``, on the event loop that serves HTTP, as in vLLM's own
server: its output handler detokenizes each engine step and wakes the requests' streams on that same
loop, so a delta reaches its client with no thread hop and no second Python thread competing for the
GIL. Only the start-up (minutes: processes, profiling, compiling) runs in the engine's thread, so the
server answers ``/health`` while vLLM starts. Started outside any event loop (the in-process
benchmark), the engine runs vLLM on a loop of its own in that thread instead, and deltas cross to the
caller's loop once per engine step. Nothing imports vLLM until ``start()``: vLLM spawns processes, and
the default environment does not have it.

Cancelling a request cancels its task, which makes ``generate`` abort it in the engine core (its KV
blocks are freed at the next step). If the engine core dies, ``healthy`` turns false (``/health``
answers 503) and requests fail with a 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from snark.config import Settings
from snark.engine.base import SHUTTING_DOWN, STILL_LOADING, Engine, EngineState, ModelFacts
from snark.engine.prompt import PromptBuilder
from snark.engine.request import GenerationRequest, Outbox, PromptInputs, StreamEvent
from snark.engine.token_text import TokenTexts
from snark.engine.vllm import args as vllm_args
from snark.engine.vllm.logprobs import read_completion
from snark.engine.vllm.prompt import VllmPrompt, VllmPromptBuilder
from snark.engine.vllm.runtime import Runtime, load_runtime
from snark.engine.vllm.sampling import vllm_sampling_fields, vllm_structured_fields
from snark.errors import InvalidRequest, ModelNotReady, Overloaded, ShuttingDown
from snark.values import ChatTurn, FinishReason, SamplingParams, ToolSpec

log = logging.getLogger(__name__)

ENGINE_DIED = "vLLM's engine process has stopped (its log above says why): restart Snark."
_INLINE_PROMPT_CHARS = 16_384  # text prompts up to this size are built on the event loop (well under 1 ms)
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


class VllmEngine(Engine):
    """vLLM's async engine behind Snark's seam. Its thread (``_main``) builds the engine (minutes:
    processes, profiling, compiling), then runs vLLM's event loop."""

    name = "vllm"
    thread_name = "snark-vllm"
    still_loading = "vLLM is still starting"

    def __init__(self, settings: Settings) -> None:
        super().__init__(max_batch_size=vllm_args.max_num_seqs(settings))
        self.settings = settings
        self.max_waiting_requests = settings.max_waiting_requests
        self.runtime: Runtime | None = None  # None before start-up and after stop()
        self._facts: ModelFacts | None = None
        self._texts: TokenTexts | None = None  # token id -> text and bytes, for log-probabilities
        self.prompts: VllmPromptBuilder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where vLLM lives: the server's loop, or its own
        self._own_loop = False  # True: started outside any loop, vLLM runs on a loop in the engine's thread
        self._lock = threading.Lock()
        self._stopping = False
        self._live: dict[GenerationRequest, asyncio.Task | Future] = {}  # submitted and not yet ended
        self._outbox: Outbox | None = None  # with a loop of its own: one cross-thread delivery per engine step
        self._flush_scheduled = False

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, on_load_failed: Callable[[BaseException], None] | None = None) -> None:
        """Start vLLM (in the engine's thread) for the calling event loop: the server's, where requests
        will arrive. Called outside any loop, the engine gives vLLM a loop of its own."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._own_loop = True
            self._outbox = Outbox()
        super().start(on_load_failed)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, cancel the live ones (their streams end as a shutdown) and shut vLLM's
        processes down. Call it from any thread but the event loop's own (``asyncio.to_thread``)."""
        with self._lock:
            self._stopping = True
            live = list(self._live.items())
        for request, _ in live:
            request.cancel()
        loop = self._loop
        if loop is not None and loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._shut_down(), loop)
            if not self._on_loop(loop):
                try:
                    done.result(timeout_s)
                except Exception as exc:  # a timeout, or vLLM's own shutdown failing: stopping goes on
                    log.warning("vLLM did not shut down cleanly: %r", exc)
        if self._thread is not None and self._own_loop:
            self._thread.join(timeout_s)
        self.state = EngineState.STOPPED

    # --- facts ------------------------------------------------------------------------------------
    @property
    def facts(self) -> ModelFacts | None:
        return self._facts

    @property
    def num_waiting(self) -> int:
        """Live requests without a first token yet (queued in vLLM or prefilling)."""
        return sum(1 for request in list(self._live) if request.first_token_at is None)

    @property
    def num_running(self) -> int:
        return len(self._live) - self.num_waiting

    @property
    def healthy(self) -> bool:
        runtime = self.runtime
        if self.state is EngineState.READY and runtime is not None and runtime.llm.errored:
            self._mark_dead()
        return self.state is EngineState.READY

    def _mark_dead(self) -> None:
        if self.state is EngineState.READY:
            log.error("vLLM's engine died; /health now answers 503")
            self.load_error = ModelNotReady(ENGINE_DIED, code="engine_dead")
            self.state = EngineState.FAILED

    @property
    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """vLLM's event loop: the one that called ``start()``, or the engine thread's own."""
        if self._loop is None:
            raise RuntimeError("the vLLM engine has not been started: call start() and wait_ready() first")
        return self._loop

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
        """True when called from ``loop``'s own thread, while it runs."""
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    # --- the asyncio side (uvicorn's loop) ----------------------------------------------------------
    def _require_ready(self) -> VllmPromptBuilder:
        if self._stopping or self.state is EngineState.STOPPED:
            raise ShuttingDown(SHUTTING_DOWN)
        if not self.healthy and self.state is EngineState.FAILED:
            raise ModelNotReady(ENGINE_DIED, code="engine_dead")
        if self.state is not EngineState.READY or self.prompts is None:
            raise ModelNotReady(STILL_LOADING)
        return self.prompts

    async def build_prompt(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> PromptInputs:
        prompts = self._require_ready()
        parts = [part for turn in turns for part in turn.parts]
        if (
            all(isinstance(part, str) for part in parts)
            and sum(len(part) for part in parts if isinstance(part, str)) <= _INLINE_PROMPT_CHARS
        ):
            # Short text: the template and the tokenizer take a fraction of a millisecond, less than a hop to a
            # worker thread, and a worker would compete for the GIL with vLLM's output handler on this loop.
            return prompts.build(turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools)
        return await asyncio.to_thread(prompts.build, turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools)

    # Raw prompts (/v1/completions, /tokenize): the same checks as on Snark's engine.
    def _text_prompts(self) -> PromptBuilder:
        return self._require_ready().builder

    def prompt_from_ids(self, ids: Sequence[int], *, param: str = "prompt") -> PromptInputs:
        return self._require_ready().from_ids(ids, param=param)

    @property
    def max_model_len(self) -> int:
        runtime = self.runtime
        if runtime is None:
            raise ModelNotReady(STILL_LOADING)
        return runtime.max_model_len

    # vLLM's prefix cache takes a block as soon as a step schedules it: choices submitted together share it.
    shares_prefill_when_submitted_together = True

    async def prepare(self, params: SamplingParams) -> SamplingParams:
        """Write the request's grammar (vLLM compiles it in its own engine) off the event loop: a schema
        xgrammar cannot take is a 400 here, before the request reaches vLLM."""
        structure = params.structure
        if structure is None or structure.compiled is not None:
            return params
        fields = await asyncio.to_thread(vllm_structured_fields, structure)
        return dataclasses.replace(params, structure=dataclasses.replace(structure, compiled=fields))

    def submit(self, prompt: PromptInputs, params: SamplingParams, *, deliver_deltas: bool = True) -> GenerationRequest:
        self._require_ready()
        if not isinstance(prompt, VllmPrompt):
            raise TypeError("the vLLM engine takes prompts from its own build_prompt()")
        self._require_prepared(params)
        request = GenerationRequest(prompt=prompt, params=params, deliver_deltas=deliver_deltas)
        request.bind_to_running_loop()
        with self._lock:
            if self._stopping:
                raise ShuttingDown(SHUTTING_DOWN)
            if len(self._live) >= self.max_batch_size + self.max_waiting_requests:
                raise Overloaded(
                    f"{len(self._live)} requests are already running or waiting (SNARK_MAX_WAITING_REQUESTS="
                    f"{self.max_waiting_requests} past the {self.max_batch_size} running): retry shortly."
                )
            loop = self._started_loop
            if self._on_loop(loop):  # the server's loop: vLLM's own, no thread hop
                self._live[request] = loop.create_task(self._generate(request), name=request.id)
            else:
                self._live[request] = asyncio.run_coroutine_threadsafe(self._generate(request), loop)
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Cancel the request's task on vLLM's loop: ``generate`` then aborts it in the engine core."""
        if request.is_done:
            return
        request.cancel()
        handle = self._live.get(request)
        if handle is None:
            return
        loop = self._loop
        if isinstance(handle, asyncio.Task) and loop is not None and not self._on_loop(loop):
            loop.call_soon_threadsafe(handle.cancel)  # a task is cancelled from its own loop only
        else:
            handle.cancel()  # a Future from run_coroutine_threadsafe: thread-safe

    # --- the engine's thread: vLLM's start-up, then its own loop if it has one ---------------------
    def _main(self, on_load_failed: Callable[[BaseException], None] | None) -> None:
        try:
            self.runtime = load_runtime(self.settings)
            context_len = self.runtime.max_model_len
            self.prompts = VllmPromptBuilder(
                self.runtime.processor,
                max_prompt_tokens=vllm_args.prompt_token_limit(self.settings, context_len),
                max_item_tokens=self.runtime.max_item_tokens,
            )
            self.default_sampling = self.runtime.default_sampling
            self._texts = TokenTexts(self.runtime.processor.tokenizer)
            self._facts = self.runtime.facts
        except BaseException as exc:
            self._load_failed(exc, on_load_failed)
            return
        if not self._own_loop:
            self._loaded()  # vLLM's output handler starts on the server's loop with the first request
            return
        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loaded()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shut_down(self) -> None:
        """On vLLM's loop: end the live requests (their streams end as a shutdown), then stop vLLM."""
        pending = [
            asyncio.ensure_future(handle) if isinstance(handle, asyncio.Task) else asyncio.wrap_future(handle)
            for handle in self._live.values()
        ]
        for handle in self._live.values():
            handle.cancel()
        if pending:  # let the cancelled requests abort and end their streams first
            await asyncio.wait(pending, timeout=5)
        runtime, self.runtime = self.runtime, None
        if runtime is not None:  # None: an earlier stop() shut it down already
            runtime.llm.shutdown()
        for _ in range(3):  # let vLLM's cancelled output handler finish on this loop
            await asyncio.sleep(0)
        if self._own_loop:
            asyncio.get_running_loop().stop()

    async def _generate(self, request: GenerationRequest) -> None:
        """One request's life on vLLM's loop: stream its deltas until it ends, however it ends."""
        prompt = request.prompt
        assert isinstance(prompt, VllmPrompt)  # submit() takes no other prompts
        handed_at = time.perf_counter()
        request.scheduled_at = handed_at
        try:
            runtime = self.runtime
            if runtime is None:  # stop() has shut vLLM down
                raise ShuttingDown(SHUTTING_DOWN)
            stream = runtime.llm.generate(
                runtime.tokens_prompt(prompt), runtime.sampling_params(vllm_sampling_fields(request.params)), request.id
            )
            checked = False
            async for output in stream:
                if not checked:
                    _check_prompt_length(prompt, output)
                    checked = True
                self._on_output(request, output, handed_at)
        except asyncio.CancelledError:  # cancel() or stop(): generate() has aborted it in vLLM
            self._flush()
            request.finish(FinishReason.CANCELLED)
        except Exception as exc:
            self._flush()
            request.fail(self._client_error(exc))
        finally:
            with self._lock:
                self._live.pop(request, None)
            self._notify_listeners(request)

    def _on_output(self, request: GenerationRequest, output, handed_at: float) -> None:
        now = time.perf_counter()
        completion = read_completion(request, output, self._texts)  # logprobs in Snark's terms
        if completion.token_ids:
            if request.first_token_at is None:
                request.first_token_at = now
                request.scheduled_at = handed_at + _queued_s(output)
            request.completion_tokens += len(completion.token_ids)
        if completion.text or completion.logprobs:
            self._post(request, StreamEvent(text=completion.text, logprobs=completion.logprobs))
        if output.finished:
            request.finish(_FINISH_REASONS.get(completion.finish_reason, FinishReason.STOP), self._outbox)
            self._schedule_flush()

    def _post(self, request: GenerationRequest, event: StreamEvent) -> None:
        request.push(event, self._outbox)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # On a loop of its own, the output handler wakes every request of an engine step at once; this
        # flush runs after them, so the caller's loop wakes once per step, not once per request.
        if self._outbox is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._started_loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox is not None:
            self._outbox.flush()

    def _client_error(self, exc: Exception) -> Exception:
        """vLLM's exception -> what the client should see."""
        runtime = self.runtime
        if runtime is None:  # stop() has shut vLLM down
            return ShuttingDown(SHUTTING_DOWN)
        if runtime.is_engine_dead(exc) or runtime.llm.errored:
            self._mark_dead()
            return ModelNotReady(ENGINE_DIED, code="engine_dead")
        if runtime.is_validation_error(exc):
            return InvalidRequest(f"vLLM refused the request: {exc}")
        log.error("vLLM request failed: %r", exc)
        return exc


def _check_prompt_length(prompt: VllmPrompt, output) -> None:
    """vLLM expands the image and video pads itself: its count must be Snark's, or the usage, the limits
    and the resolution caps Snark enforced were not what vLLM ran."""
    expanded = output.prompt_token_ids
    if expanded is not None and len(expanded) != prompt.num_tokens:
        raise RuntimeError(
            f"vLLM expanded the prompt to {len(expanded)} tokens where Snark counted {prompt.num_tokens} "
            "(a bug in how Snark hands images or videos to vLLM)"
        )


def _queued_s(output) -> float:
    """Seconds the request waited in vLLM's scheduler, when vLLM reports it (its stats are on by default)."""
    stats = getattr(output, "metrics", None)
    queued, scheduled = getattr(stats, "queued_ts", None), getattr(stats, "scheduled_ts", None)
    if isinstance(queued, float) and isinstance(scheduled, float) and scheduled >= queued:
        return scheduled - queued
    return 0.0
