"""Snark's own engine: continuous batching on a Hugging Face Qwen2.5-VL, one generation thread.

    submit() ──► waiting (bounded) ──► generation thread, one step at a time:
                                          1. admit: the oldest waiting requests that fit join
                                          2. prefill them together (their first token)
                                          3. decode one token for every running row
                                          4. stream each row's text; retire rows that ended
    client ◄── asyncio queue ◄── loop.call_soon_threadsafe ◄── Outbox (one wake-up per step)

Requests join and leave the running batch at every step: a short request that arrives while long
ones run starts at the next step and leaves as soon as it is done. ``max_batch_size=1`` is the
one-request-at-a-time "GPU lock" design. The event loop never touches the model: prompt building
runs in a thread pool, every forward pass in the generation thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from PIL import Image

from snark.engine.base import SHUTTING_DOWN, STILL_LOADING, Engine, EngineState, ModelFacts
from snark.engine.loader import LoadedModel
from snark.engine.prompt import PromptBuilder
from snark.engine.request import ChatTurn, FinishReason, GenerationRequest, Outbox, PromptInputs, RequestState, SamplingParams, ToolSpec
from snark.engine.transformers.cache import RowCache
from snark.engine.transformers.compiled import allow_recompiles, compile_step, require_cuda, warm_up
from snark.engine.transformers.grammar import Grammars, StepMasks
from snark.engine.transformers.rows import Row
from snark.engine.transformers.runner import ChunkedPrefill, Runner
from snark.engine.transformers.sampler import next_tokens, sampling_defaults
from snark.engine.transformers.scheduler import Scheduler
from snark.errors import ModelNotReady, ShuttingDown

log = logging.getLogger(__name__)

PREPARING_WAIT_FACTOR = 20  # x batch_wait_ms: how long an idle engine waits for prompts being built
CPU_KV_CACHE_BYTES = 4 * 1024**3  # the KV budget on CPU unless SNARK_KV_CACHE_GIB says otherwise
CUDA_KV_CACHE_FRACTION = 0.8  # of the GPU memory still free once the weights are loaded


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        loader: Callable[[], LoadedModel],
        *,
        max_batch_size: int = 16,
        batch_wait_ms: float = 0.0,
        max_waiting_requests: int = 64,
        max_prompt_tokens: int = 32768,
        max_prefill_tokens: int = 8192,
        kv_cache_bytes: int | None = None,
        compile_decode: bool = False,
        allow_cpu_compile: bool = False,  # tests only: compile with inductor's CPU backend
    ) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self._loader = loader
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_prompt_tokens = max_prompt_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.compile_decode = compile_decode
        self.allow_cpu_compile = allow_cpu_compile
        self.loaded: LoadedModel | None = None
        self.prompts: PromptBuilder | None = None
        self.cache: RowCache | None = None
        self.grammars: Grammars | None = None  # constrained decoding: compiles off this engine's thread
        self.masks: StepMasks | None = None
        self.scheduler = Scheduler(
            max_rows=max_batch_size, max_waiting=max_waiting_requests, max_prefill_tokens=max_prefill_tokens
        )
        self._preparing = 0  # prompts being built: requests about to be submitted
        self._cond = threading.Condition()
        self._stopping = False
        self._kv_cache_usage = 0.0  # set by the generation thread after each step, read by /metrics
        self.max_prefill_tokens = max_prefill_tokens
        self._chunked: ChunkedPrefill | None = None  # a long prompt being prefilled a chunk per step
        self.prefill_chunks_run = 0  # chunks of long prompts so far (logs and tests)

    # --- lifecycle --------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones, cancel the running ones (they end at the
        next step), and wait for the generation thread."""
        with self._cond:
            self._stopping = True
            waiting, self.scheduler.waiting = self.scheduler.waiting, []
            self._cond.notify_all()
        for request in waiting:
            request.fail(ShuttingDown(SHUTTING_DOWN))
        for row in list(self.scheduler.running):
            row.request.cancel()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.grammars is not None:
            self.grammars.close()
        self.state = EngineState.STOPPED

    # --- facts ------------------------------------------------------------------------------------
    @property
    def facts(self) -> ModelFacts | None:
        loaded = self.loaded
        if loaded is None:
            return None
        return ModelFacts(
            name=loaded.name,
            engine=self.name,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            attention=loaded.attn_implementation,
            is_tiny=loaded.is_tiny,
        )

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def kv_cache_budget_tokens(self) -> int:
        return self.cache.budget_tokens if self.cache else 0

    @property
    def kv_cache_usage(self) -> float:
        return self._kv_cache_usage

    # --- the asyncio side ---------------------------------------------------------------------------
    def _require_ready(self) -> PromptBuilder:
        if self._stopping or self.state is EngineState.STOPPED:
            raise ShuttingDown(SHUTTING_DOWN)
        if self.state is not EngineState.READY or self.prompts is None:
            raise ModelNotReady(STILL_LOADING)
        return self.prompts

    async def build_prompt(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> PromptInputs:
        """Tokenize and preprocess images in a worker thread (CPU-heavy for big images). An idle
        engine waiting for companions meanwhile waits a little longer for this request."""
        prompts = self._require_ready()
        with self._cond:
            self._preparing += 1
        try:
            return await asyncio.to_thread(prompts.build, turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools)
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    async def prepare(self, params: SamplingParams) -> SamplingParams:
        """Compile the request's output grammar (cached by schema) in the grammar thread."""
        structure = params.structure
        if structure is None or structure.compiled is not None:
            return params
        self._require_ready()
        compiled = await self.grammars.compile(structure)
        return dataclasses.replace(params, structure=dataclasses.replace(structure, compiled=compiled))

    def submit(self, prompt: PromptInputs, params: SamplingParams, *, deliver_deltas: bool = True) -> GenerationRequest:
        self._require_ready()
        self._require_prepared(params)
        request = GenerationRequest(prompt=prompt, params=params, deliver_deltas=deliver_deltas)
        self.scheduler.check_fits_alone(request, self.cache)
        request.bind_to_running_loop()
        with self._cond:
            if self._stopping:
                raise ShuttingDown(SHUTTING_DOWN)
            self.scheduler.add(request)
            self._cond.notify()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """A waiting request leaves the queue (and frees its place) at once; a running one ends at
        the next step, which frees its KV cache room. A no-op for a finished request."""
        if request.is_done:
            return
        request.cancel()
        with self._cond:
            if self.scheduler.remove_waiting(request):
                request.drop()

    # --- the generation thread --------------------------------------------------------------------
    def _main(self, on_load_failed: Callable[[BaseException], None] | None) -> None:
        try:
            self._load()
        except BaseException as exc:
            self._load_failed(exc, on_load_failed)
            return
        self._loaded()
        # The cache's tensors are inference tensors: every step (and every cache move) runs in this mode.
        with torch.inference_mode():
            while (admitted := self._next_admissions()) is not None:
                try:
                    self._step(admitted)
                except Exception as exc:  # a bug outside the forward passes: fail the batch, keep serving
                    log.exception("a generation step failed")
                    self._fail_all(exc, admitted)
            self._end_running()

    def _load(self) -> None:
        if self.compile_decode and not self.allow_cpu_compile:
            require_cuda()  # before minutes of loading weights
        loaded = self._loader()
        self.loaded = loaded
        self.prompts = PromptBuilder(loaded.processor, max_prompt_tokens=self.max_prompt_tokens)
        tokenizer = loaded.processor.tokenizer
        gen = loaded.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        self.default_sampling = sampling_defaults(gen)
        self.runner = Runner(loaded, pad_token_id=pad)
        self.cache = self._build_cache(loaded)
        vocab_size = loaded.model.config.text_config.vocab_size
        self.grammars = Grammars(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.eos_token_ids, max_queued=self.scheduler.max_waiting
        )
        self.masks = StepMasks(vocab_size)
        if self.compile_decode:
            self._compile(loaded)
        else:
            self._warm_up()
        log.info(
            "KV cache budget: %d tokens (%.2f GiB at %d bytes a token), up to %d rows",
            self.cache.budget_tokens, self.cache.budget_tokens * self.cache.bytes_per_token / 1024**3,
            self.cache.bytes_per_token, self.max_batch_size,
        )  # fmt: skip

    def _build_cache(self, loaded: LoadedModel) -> RowCache:
        text = loaded.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache = RowCache(
            num_layers=text.num_hidden_layers, kv_heads=text.num_key_value_heads, head_dim=head_dim,
            dtype=loaded.dtype, device=loaded.device, budget_tokens=0, max_rows=self.max_batch_size,
            static=self.compile_decode,
        )  # fmt: skip
        budget = self.kv_cache_bytes
        if budget is None and loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            budget = int(free * CUDA_KV_CACHE_FRACTION)
        cache.budget_tokens = (budget if budget is not None else CPU_KV_CACHE_BYTES) // cache.bytes_per_token
        return cache

    def _warm_up(self) -> None:
        """One short text request and one with an image through the whole loop before ``/health`` says
        ready: the first forward passes (and the image processor's first call) are several times slower
        than the rest, and a user's first request should not pay for them."""
        started = time.perf_counter()
        image = Image.new("RGB", (56, 56), (128, 128, 128))
        turns = [[ChatTurn("user", ["Warm up."])], [ChatTurn("user", [image, "Warm up."])]]
        prompts = [self.prompts.build(t, min_pixels=4 * 28 * 28, max_pixels=4 * 28 * 28) for t in turns]
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        with torch.inference_mode():
            self._run_to_completion([GenerationRequest(prompt=p, params=params) for p in prompts])
        log.info("warmed up in %.2f s", time.perf_counter() - started)

    def _compile(self, loaded: LoadedModel) -> None:
        """Compile the decode step and run every row bucket once, before the first request."""
        if not self.allow_cpu_compile:
            require_cuda(loaded.device)
        allow_recompiles(self.max_batch_size)
        self.runner.compiled_step = compile_step(loaded.model, loaded.device)
        prompt = self.prompts.build([ChatTurn("user", ["Warm up."])], min_pixels=0, max_pixels=0)
        with torch.inference_mode():
            warm_up(self._run_to_completion, prompt, max_rows=self.max_batch_size)

    def _run_to_completion(self, requests: list[GenerationRequest]) -> None:
        """Run start-up ``requests`` (unbound: their events go nowhere) through the loop until they
        end. Listeners do not hear of them: /metrics counts users' requests only."""
        listeners, self._listeners = self._listeners, []
        try:
            self.scheduler.waiting.extend(requests)
            while not all(r.is_done for r in requests):
                self._step(self._admit())
        finally:
            self._listeners = listeners

    def _next_admissions(self) -> list[GenerationRequest] | None:
        """Block until there is work; return the requests that join at this step (None: stop)."""
        with self._cond:
            while not (self.scheduler.waiting or self.scheduler.running or self._chunked or self._stopping):
                self._cond.wait()
            if self._stopping:
                return None
            if not self.scheduler.running and not self._chunked and self.batch_wait_s > 0:
                self._wait_for_companions()
            self.scheduler.drop_cancelled()
            return self._admit()

    def _admit(self) -> list[GenerationRequest]:
        if self._chunked is not None:
            return []  # first come, first served: nobody overtakes a prompt being prefilled
        return self.scheduler.admit(self.cache)

    def _wait_for_companions(self) -> None:
        """An idle engine gives concurrent arrivals ``batch_wait_ms`` to join its first prefill (longer,
        up to PREPARING_WAIT_FACTOR times, while their prompts are still being built)."""
        first = time.perf_counter()
        deadline, longest = first + self.batch_wait_s, first + PREPARING_WAIT_FACTOR * self.batch_wait_s
        while len(self.scheduler.waiting) < self.max_batch_size and not self._stopping:
            left = (longest if self._preparing else deadline) - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _step(self, admitted: list[GenerationRequest]) -> None:
        """One iteration: prefill the rows that join, decode every running row, retire ended rows."""
        running = self.scheduler.running
        if admitted:
            now = time.perf_counter()
            rows = [self._row(request, now) for request in admitted]
            if len(rows) == 1 and rows[0].joining.prompt_tokens > self.max_prefill_tokens:
                self._start_chunked(rows[0])
            elif self._run(rows, self.runner.prefill):
                running.extend(rows)
        if self._chunked is not None:
            self._advance_chunked()
        outbox = Outbox()
        for row in running:
            if not row.done and row.request.cancel_requested:
                row.end(FinishReason.CANCELLED, outbox)
        outbox.flush()
        self._retire()
        if running := self.scheduler.running:
            self._run(running, self.runner.decode)
            self._retire()
        self._kv_cache_usage = self.cache.footprint() / self.cache.budget_tokens if self.cache.budget_tokens else 0.0

    def _row(self, request: GenerationRequest, now: float) -> Row:
        return Row(
            request, tokenizer=self.loaded.processor.tokenizer, eos_token_ids=self.eos_token_ids,
            vocab_size=self.loaded.model.config.text_config.vocab_size, device=self.loaded.device, now=now,
        )  # fmt: skip

    def _run(self, rows: list[Row], forward: Callable[[list[Row], RowCache], torch.Tensor]) -> bool:
        """Run ``forward`` (prefill or decode) for ``rows``, sample, and stream. A failure (a bug or an
        out-of-memory) fails these rows; the engine goes on serving."""
        try:
            logits = forward(rows, self.cache)
            grammars = [row.grammar for row in rows]
            constrain = partial(self.masks.apply, grammars=grammars) if any(grammars) else None
            tokens = next_tokens(logits, [row.sampler for row in rows], constrain=constrain)
        except Exception as exc:
            log.exception("a %s step failed for %d rows", forward.__name__, len(rows))
            if self.cache.num_rows == len(self.scheduler.running) and rows is not self.scheduler.running:
                self._fail([row.request for row in rows], exc)  # a prefill that left the cache as it was
            else:
                self._fail_all(exc, [row.request for row in rows])
            return False
        now = time.perf_counter()
        outbox = Outbox()
        for row, token in zip(rows, tokens):
            row.accept(token, outbox, now)
        outbox.flush()
        return True

    def _start_chunked(self, row: Row) -> None:
        try:  # the vision tower runs here, on every image of the prompt at once
            self._chunked = self.runner.start_chunked(row, chunk_tokens=self.max_prefill_tokens)
        except Exception as exc:
            log.exception("preparing a long prompt failed")
            self._fail([row.request], exc)

    def _advance_chunked(self) -> None:
        """Prefill the next chunk of the long prompt; once it is all in and fits the cache (rows may
        have moved since it was admitted), it joins the running rows with its first token."""
        chunked, row = self._chunked, self._chunked.row
        if row.request.cancel_requested:
            self._chunked = None
            row.end(FinishReason.CANCELLED, outbox := Outbox())
            outbox.flush()
            self._notify_listeners(row.request)
            return
        if not chunked.finished:
            try:
                chunked.logits = chunked.run_chunk()
            except Exception as exc:
                log.exception("a prefill chunk failed")
                self._chunked = None
                self._fail([row.request], exc)
                return
            self.prefill_chunks_run += 1
        if chunked.finished and self.cache.fits([row.joining]):
            self._chunked = None
            self._run([row], lambda rows, cache: self._insert_chunked(chunked, cache))
            if not row.done:
                self.scheduler.running.append(row)
            elif row.request.state is not RequestState.FAILED:
                self._notify_listeners(row.request)

    @staticmethod
    def _insert_chunked(chunked: ChunkedPrefill, cache: RowCache) -> torch.Tensor:
        cache.insert(chunked.capture.keys, chunked.capture.values, [chunked.row.joining])
        return chunked.logits

    def _fail(self, requests: list[GenerationRequest], exc: Exception) -> None:
        for request in requests:
            if not request.is_done:
                request.fail(exc)
            self._notify_listeners(request)

    def _fail_all(self, exc: Exception, admitted: list[GenerationRequest]) -> None:
        """Fail every running row and ``admitted``, and start the shared cache over: a failure in the
        middle of a step may have left it half-written."""
        running = [row.request for row in self.scheduler.running]
        if self._chunked is not None:
            running.append(self._chunked.row.request)
            self._chunked = None
        self.scheduler.running = []
        self.cache.clear()
        self._fail(running + [r for r in admitted if r not in running], exc)

    def _retire(self) -> None:
        for row in self.scheduler.retire(self.cache):
            self._notify_listeners(row.request)

    def _end_running(self) -> None:
        """Stopping: running rows end as cancelled (their clients see a shutdown)."""
        outbox = Outbox()
        if self._chunked is not None:
            self._chunked.row.end(FinishReason.CANCELLED, outbox)
            self._notify_listeners(self._chunked.row.request)
            self._chunked = None
        for row in self.scheduler.running:
            if not row.done:
                row.end(FinishReason.CANCELLED, outbox)
        outbox.flush()
        self._retire()
