"""The engine: one worker thread owns the model; requests reach it through a waiting list.

    submit() ──► waiting (bounded) ──► worker: select_batch ─► collate ─► generate(batch)
                                                                   │ per step
    client ◄── asyncio queue ◄── loop.call_soon_threadsafe ◄── BatchTracker

Requests that wait together (up to ``max_batch_size``, after at most ``batch_wait_ms``) run as one
left-padded ``generate``; ``max_batch_size=1`` is the one-request-at-a-time "GPU lock" design. The
event loop never touches the model: prompt building runs in a thread pool, generation in the
worker, and events come back through ``GenerationRequest.push``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from snark.engine.batching import bucket_size, collate, select_batch
from snark.engine.compile import (
    DecodeCaches,
    allow_recompiles,
    compile_config,
    ensure_compiled,
    padding_row,
    require_cuda,
    warm_up,
)
from snark.engine.loader import LoadedModel
from snark.engine.prompt import PromptBuilder
from snark.engine.request import (
    ChatTurn,
    GenerationRequest,
    PromptInputs,
    RequestState,
    SamplingParams,
    StreamEvent,
)
from snark.engine.sampling import PerRowSampler, sampling_defaults
from snark.engine.tracker import BatchTracker
from snark.errors import ModelNotReady, Overloaded

log = logging.getLogger(__name__)

SHUTTING_DOWN = "The server is shutting down; retry on another replica."
PREPARING_WAIT_FACTOR = 20  # x batch_wait_ms: how long a forming batch waits for prompts being built


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Engine:
    def __init__(
        self,
        loader: Callable[[], LoadedModel],
        *,
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
        max_waiting_requests: int = 64,
        max_prompt_tokens: int = 32768,
        compile_decode: bool = False,
        allow_cpu_compile: bool = False,  # tests only: compile with inductor's CPU backend
    ) -> None:
        self._loader = loader
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_waiting_requests = max_waiting_requests
        self.max_prompt_tokens = max_prompt_tokens
        self.compile_decode = compile_decode
        self.allow_cpu_compile = allow_cpu_compile
        self._decode_caches: DecodeCaches | None = None  # set once the compiled decode step is warm
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None
        self.loaded: LoadedModel | None = None
        self.prompts: PromptBuilder | None = None
        self.default_sampling = SamplingParams()
        self._waiting: list[GenerationRequest] = []
        self._preparing = 0  # prompts being built: requests about to be submitted
        self._running: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._ready = threading.Event()
        self._listeners: list[Callable[[GenerationRequest], None]] = []

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, on_load_failed: Callable[[BaseException], None] | None = None) -> None:
        """Start the worker: it loads the model, then serves batches. Returns at once."""
        self._worker = threading.Thread(target=self._main, args=(on_load_failed,), name="snark-engine", daemon=True)
        self._worker.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the model is loaded; re-raise the load error if it failed."""
        self._ready.wait(timeout_s)
        if self.load_error is not None:
            raise self.load_error
        if self.state is not EngineState.READY:
            raise TimeoutError("the model is still loading")

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for request in waiting:
            request.fail(ModelNotReady(SHUTTING_DOWN))
        for request in list(self._running):
            request.cancel()
        if self._worker is not None:
            self._worker.join(timeout_s)
        self.state = EngineState.STOPPED

    def add_listener(self, listener: Callable[[GenerationRequest], None]) -> None:
        """``listener(request)`` runs in the worker thread when a request ends (metrics hook)."""
        self._listeners.append(listener)

    @property
    def started(self) -> bool:
        return self._worker is not None

    # --- the asyncio side ---------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.name if self.loaded else "loading"

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _require_ready(self) -> PromptBuilder:
        if self._stopping or self.state is EngineState.STOPPED:
            raise ModelNotReady(SHUTTING_DOWN)
        if self.state is not EngineState.READY or self.prompts is None:
            raise ModelNotReady("The model is still loading: retry when GET /health answers 200.")
        return self.prompts

    async def build_prompt(self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int) -> PromptInputs:
        """Tokenize and preprocess images in a worker thread (CPU-heavy for big images). A batch being
        formed meanwhile waits a little longer for this request (see ``_next_batch``)."""
        prompts = self._require_ready()
        with self._cond:
            self._preparing += 1
        try:
            prompt = await asyncio.to_thread(prompts.build, turns, min_pixels=min_pixels, max_pixels=max_pixels)
        except BaseException:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()  # this request will not arrive: a batch waiting for it can start
            raise
        with self._cond:
            self._preparing -= 1  # no notify: submit() notifies when the request arrives
        return prompt

    def submit(self, prompt: PromptInputs, params: SamplingParams, *, deliver_deltas: bool = True) -> GenerationRequest:
        """Queue a request; its events arrive on the calling event loop. Raises ``Overloaded``."""
        self._require_ready()
        request = GenerationRequest(prompt=prompt, params=params, deliver_deltas=deliver_deltas)
        request.bind_to_running_loop()
        with self._cond:
            if self._stopping:
                raise ModelNotReady(SHUTTING_DOWN)
            if len(self._waiting) >= self.max_waiting_requests:
                raise Overloaded(
                    f"{len(self._waiting)} requests are already waiting (SNARK_MAX_WAITING_REQUESTS); retry shortly.",
                    retry_after_s=1,
                )
            self._waiting.append(request)
            self._cond.notify()
        return request

    async def follow(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield a submitted request's events. Leaving the loop early (client gone, timeout) cancels the row.
        Routes submit first, then follow: a full queue then raises ``Overloaded`` while they can still
        answer 503, not inside a stream that has already started."""
        try:
            async for event in request.events():
                yield event
        finally:
            self.cancel(request)

    async def generate(self, prompt: PromptInputs, params: SamplingParams) -> GenerationRequest:
        """Run to completion and return the finished request (text, counts, timing)."""
        request = self.submit(prompt, params, deliver_deltas=False)
        try:
            async for _ in request.events():
                pass
        finally:
            self.cancel(request)
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Stop ``request`` if it is still live: a waiting one leaves the queue (and frees its place) at
        once, a running one ends at its next decoding step. A no-op for a finished request."""
        if not request.is_done:
            request.cancel()
            self._drop_if_waiting(request)

    def _drop_if_waiting(self, request: GenerationRequest) -> None:
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)
                request.drop()

    # --- the worker thread ------------------------------------------------------------------------
    def _main(self, on_load_failed: Callable[[BaseException], None] | None) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to /health, the CLI and the log
            self.load_error = exc
            self.state = EngineState.FAILED
            self._ready.set()
            log.error("model load failed: %s", exc)
            if on_load_failed is not None:
                on_load_failed(exc)
            return
        self.state = EngineState.READY
        self._ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:  # empty when every waiting request left during the batch wait
                self._run_batch(batch)

    def _load(self) -> None:
        if self.compile_decode and not self.allow_cpu_compile:
            require_cuda()  # before minutes of loading weights
        loaded = self._loader()
        self.loaded = loaded
        self.prompts = PromptBuilder(loaded.processor, max_prompt_tokens=self.max_prompt_tokens)
        tokenizer = loaded.processor.tokenizer
        gen = loaded.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        self.image_token_id = loaded.model.config.image_token_id
        self.default_sampling = sampling_defaults(gen)
        if self.compile_decode:
            self._warm_up_compiled()

    def _next_batch(self) -> list[GenerationRequest] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            # Give concurrent arrivals a moment to join, unless the batch is already full. Requests whose
            # prompts are still being built arrived too (a burst of images takes a while to preprocess):
            # waiting up to PREPARING_WAIT_FACTOR times longer for them beats leaving them a whole batch behind.
            first = time.perf_counter()
            deadline, longest = first + self.batch_wait_s, first + PREPARING_WAIT_FACTOR * self.batch_wait_s
            while len(self._waiting) < self.max_batch_size:
                left = (longest if self._preparing else deadline) - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            live = [r for r in self._waiting if not r.cancel_requested]
            for request in self._waiting:
                if request.cancel_requested:
                    request.drop()
            chosen = [live[i] for i in select_batch(live, [r.prompt.num_tokens for r in live], max_batch_size=self.max_batch_size)]
            self._waiting = [r for r in live if r not in chosen]
            self._running = chosen
            return chosen

    def _run_batch(self, batch: list[GenerationRequest]) -> None:
        assert self.loaded is not None
        try:
            self._generate(batch)
        except Exception as exc:  # a bug or an out-of-memory: fail these rows, keep serving
            log.exception("generation failed for a batch of %d", len(batch))
            for request in batch:
                if not request.is_done:
                    request.fail(exc)
        finally:
            self._running = []
            for request in batch:
                for listener in self._listeners:
                    try:
                        listener(request)
                    except Exception:
                        log.exception("engine listener failed")

    def _generate(self, batch: list[GenerationRequest]) -> None:
        loaded = self.loaded
        rows = list(batch)
        if self._decode_caches is not None:  # compiled: fixed batch shapes, filled with finished rows
            rows += [padding_row(batch[0]) for _ in range(bucket_size(len(batch), self.max_batch_size) - len(batch))]
        inputs = collate([r.prompt for r in rows], pad_token_id=self.pad_token_id, image_token_id=self.image_token_id)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        tracker = BatchTracker(rows, loaded.processor.tokenizer, self.eos_token_ids)
        processors = LogitsProcessorList()
        if any(r.params.needs_logits_processing for r in rows):
            processors.append(
                PerRowSampler(
                    [r.params for r in rows],
                    [r.prompt.num_tokens for r in rows],
                    device=loaded.device,
                    row_done=lambda row: tracker.rows[row].done,
                )
            )
        max_new = max(r.params.max_new_tokens for r in rows)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=[],  # the tracker ends each row: at its end-of-turn, or never with ignore_eos
            pad_token_id=self.pad_token_id,
        )
        with torch.inference_mode():  # the cache's tensors are inference tensors: reset them in this mode too
            if self._decode_caches is not None:
                config.compile_config = compile_config(loaded.device)
                width, ceiling = inputs["input_ids"].shape[1], self.max_prompt_tokens + max_new
                inputs["past_key_values"] = self._decode_caches.get(len(rows), width + max_new, ceiling=ceiling)
            loaded.model.generate(
                **inputs,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([tracker]),
                logits_processor=processors,
            )
        tracker.close()

    def _warm_up_compiled(self) -> None:
        """Compile the decode step for every batch bucket now, not on the first user's request."""
        loaded, prompts = self.loaded, self.prompts
        if not self.allow_cpu_compile:
            require_cuda(loaded.device)
        allow_recompiles(self.max_batch_size)
        self._decode_caches = DecodeCaches(loaded.model.config)
        prompt = prompts.build([ChatTurn("user", ["Warm up."])], min_pixels=0, max_pixels=0)
        warm_up(self._generate, prompt, max_batch_size=self.max_batch_size)
        ensure_compiled(loaded.model)
