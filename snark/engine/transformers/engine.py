"""Snark's own engine: continuous batching on a paged KV cache, one generation thread.

    submit() ──► waiting (bounded) ──► generation thread, one step at a time:
                                          1. schedule: a decode token for every running row, prompt
                                             chunks under the step's prefill budget, new rows joining
                                             with their cached prefix (scheduler.py)
                                          2. run: one flat batch of tokens -> logits (runner.py)
                                          3. postprocess: sample, stream each row's text, cache the
                                             blocks that filled, retire rows that ended
    client ◄── asyncio queue ◄── loop.call_soon_threadsafe ◄── Outbox (one wake-up per step)

Requests join and leave the running batch at every step: a short request that arrives while long
ones run starts at the next step, and a long prompt never stalls running rows for more than one
chunk. ``max_batch_size=1`` is the one-request-at-a-time "GPU lock" design. The event loop never
touches the model: prompt building runs in a thread pool, every forward pass in the generation thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import torch
from PIL import Image

from snark.engine.base import SHUTTING_DOWN, STILL_LOADING, Engine, EngineState, ModelFacts
from snark.engine.loader import LoadedModel
from snark.engine.prompt import PromptBuilder
from snark.engine.request import GenerationRequest, Outbox, PromptInputs
from snark.engine.token_text import TokenTexts
from snark.engine.transformers.blocks import BlockPool
from snark.engine.transformers.encoder_cache import EncoderCache
from snark.engine.transformers.grammar import Grammars, StepMasks
from snark.engine.transformers.graphs import Capture, DecodeGraphs, cuda_capture
from snark.engine.transformers.kv_cache import KVCache
from snark.engine.transformers.rows import Row
from snark.engine.transformers.runner import Runner
from snark.engine.transformers.sampler import StepTokens, next_tokens
from snark.engine.transformers.scheduler import Scheduler, StepPlan
from snark.errors import ModelNotReady, ShuttingDown
from snark.values import ChatTurn, FinishReason, SamplingParams, ToolSpec

log = logging.getLogger(__name__)

PREPARING_WAIT_FACTOR = 20  # x batch_wait_ms: how long an idle engine waits for prompts being built
CPU_KV_CACHE_BYTES = 4 * 1024**3  # the KV budget on CPU unless SNARK_KV_CACHE_GIB says otherwise
CUDA_KV_CACHE_FRACTION = 0.8  # of the GPU memory still free once the weights are loaded
BLOCK_SIZE, FLASH_BLOCK_SIZE = 16, 256  # tokens a KV block (flash-attn's paged kernels take multiples of 256)
# Prompt tokens prefilled a step unless SNARK_MAX_PREFILL_TOKENS says otherwise. On CPU a 1024-token chunk
# already keeps the cores busy, and running rows wait one chunk (on the small benchmark checkpoint, 1024
# beat 2048 for short requests arriving behind a long prompt, and 512 cost a new image's first token).
CPU_PREFILL_TOKENS, CUDA_PREFILL_TOKENS = 1024, 2048
ENCODER_CACHE_BYTES = 512 * 1024**2
WARM_UP_MIN_PIXELS = 4 * 28 * 28  # the smallest image the model takes: 4 patches of 28x28 (one image token)

T = TypeVar("T")


def _built(part: T | None) -> T:
    """A part of the engine that its generation thread builds when it loads the model."""
    if part is None:
        raise RuntimeError("the engine has not loaded its model yet: call start() and wait_ready() first")
    return part


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
        max_prefill_tokens: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_block_size: int | None = None,
        prefix_caching: bool = True,
        encoder_cache_bytes: int = ENCODER_CACHE_BYTES,
        cuda_graphs: bool = True,
        max_image_pixels: int = 1280 * 28 * 28,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self._loader = loader
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_prompt_tokens = max_prompt_tokens
        self.max_waiting_requests = max_waiting_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.kv_block_size = kv_block_size
        self.prefix_caching = prefix_caching
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.cuda_graphs = cuda_graphs
        self.max_image_pixels = max_image_pixels  # the largest image the warm-up sends through
        # Built by the generation thread as it loads the model (``_load``); read through the properties
        # below, which raise a RuntimeError if that has not happened yet.
        self._loaded_model: LoadedModel | None = None
        self._prompts: PromptBuilder | None = None
        self._pool: BlockPool | None = None
        self._cache: KVCache | None = None
        self._scheduler: Scheduler | None = None
        self._runner: Runner | None = None
        self._grammars: Grammars | None = None  # constrained decoding: compiles off this engine's thread
        self._masks: StepMasks | None = None
        self._texts: TokenTexts | None = None  # token id -> text and bytes, for log-probabilities
        self._preparing = 0  # prompts being built: requests about to be submitted
        self._cond = threading.Condition()
        self._stopping = False
        self._kv_cache_usage = 0.0  # set by the generation thread after each step, read by /metrics
        self.prefill_chunks_run = 0  # steps that prefilled part of a prompt longer than one step's budget
        self.peak_blocks_used = 0  # the most KV blocks ever held at once (tests and logs)

    # --- lifecycle --------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones, cancel the running ones (they end at the
        next step), and wait for the generation thread."""
        with self._cond:
            self._stopping = True
            waiting: list[GenerationRequest] = []
            scheduler = self._scheduler
            if scheduler is not None:
                waiting, scheduler.waiting = scheduler.waiting, []
            self._cond.notify_all()
        for request in waiting:
            request.fail(ShuttingDown(SHUTTING_DOWN))
        if scheduler is not None:
            for row in [*scheduler.running, *scheduler.preempted]:
                row.request.cancel()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._grammars is not None:
            self._grammars.close()
        self.state = EngineState.STOPPED

    # --- parts built at load time -----------------------------------------------------------------
    @property
    def loaded(self) -> LoadedModel:
        return _built(self._loaded_model)

    @property
    def prompts(self) -> PromptBuilder:
        return _built(self._prompts)

    @property
    def pool(self) -> BlockPool:
        return _built(self._pool)

    @property
    def cache(self) -> KVCache:
        return _built(self._cache)

    @property
    def scheduler(self) -> Scheduler:
        return _built(self._scheduler)

    @property
    def runner(self) -> Runner:
        return _built(self._runner)

    @property
    def grammars(self) -> Grammars:
        return _built(self._grammars)

    @property
    def masks(self) -> StepMasks:
        return _built(self._masks)

    # --- facts ------------------------------------------------------------------------------------
    @property
    def facts(self) -> ModelFacts | None:
        loaded = self._loaded_model
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
        scheduler = self._scheduler
        return len(scheduler.waiting) + len(scheduler.preempted) if scheduler else 0

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running) if self._scheduler else 0

    @property
    def kv_cache_budget_tokens(self) -> int:
        return self._scheduler.capacity_tokens if self._scheduler else 0

    @property
    def kv_cache_usage(self) -> float:
        return self._kv_cache_usage

    @property
    def prefix_cache_counts(self) -> tuple[int, int]:
        """Prompt tokens looked up in the prefix cache, and how many were found."""
        return (self._pool.queries, self._pool.hits) if self._pool else (0, 0)

    @property
    def cache_counts(self) -> dict[str, tuple[int, int]]:
        return {"prefix": self.prefix_cache_counts, "mm": (self.encoder_cache.queries, self.encoder_cache.hits)}

    # --- the asyncio side ---------------------------------------------------------------------------
    def _require_ready(self) -> PromptBuilder:
        if self._stopping or self.state is EngineState.STOPPED:
            raise ShuttingDown(SHUTTING_DOWN)
        if self.state is not EngineState.READY or self._prompts is None:
            raise ModelNotReady(STILL_LOADING)
        return self._prompts

    async def build_prompt(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> PromptInputs:
        """Tokenize and preprocess images in a worker thread (CPU-heavy for big images). An idle
        engine waiting for companions meanwhile waits a little longer for this request."""
        prompts = self._require_ready()
        with self._cond:
            self._preparing += 1
        try:
            return await asyncio.to_thread(
                prompts.build, turns, min_pixels=min_pixels, max_pixels=max_pixels, tools=tools
            )
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    def _text_prompts(self) -> PromptBuilder:
        return self._require_ready()

    @property
    def max_model_len(self) -> int:
        """What the model's positions and the whole KV cache both hold."""
        positions = getattr(self.loaded.text_config, "max_position_embeddings", None) or self.scheduler.capacity_tokens
        return min(int(positions), self.scheduler.capacity_tokens)

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
        self.scheduler.check_fits_alone(request)
        request.bind_to_running_loop()
        with self._cond:
            if self._stopping:
                raise ShuttingDown(SHUTTING_DOWN)
            self.scheduler.add(request)
            self._cond.notify()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """A waiting request leaves the queue (and frees its place) at once; a running one ends at
        the next step, which frees its KV blocks. A no-op for a finished request."""
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
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as exc:  # a bug outside the forward pass: fail the rows, keep serving
                    log.exception("a generation step failed")
                    self._fail_all(exc)
            self._end_running()

    def _load(self) -> None:
        loaded = self._loader()
        self._loaded_model = loaded
        self._prompts = PromptBuilder(loaded.processor, max_prompt_tokens=self.max_prompt_tokens)
        tokenizer = loaded.processor.tokenizer
        gen = loaded.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else eos)
        self.default_sampling = SamplingParams.model_defaults(gen)
        flash = loaded.attn_implementation == "flash_attention_2" and loaded.device.type == "cuda"
        block_size = self.kv_block_size or (FLASH_BLOCK_SIZE if flash else BLOCK_SIZE)
        flash = flash and block_size % FLASH_BLOCK_SIZE == 0 and importlib.util.find_spec("flash_attn") is not None
        if self.max_prefill_tokens is None:
            self.max_prefill_tokens = CUDA_PREFILL_TOKENS if loaded.device.type == "cuda" else CPU_PREFILL_TOKENS
        self._cache = self._build_cache(loaded, block_size)
        self._pool = BlockPool(self.cache.num_blocks, enable_caching=self.prefix_caching)
        self._scheduler = Scheduler(
            max_rows=self.max_batch_size,
            max_waiting=self.max_waiting_requests,
            max_prefill_tokens=self.max_prefill_tokens,
            pool=self.pool,
            block_size=block_size,
        )
        self._runner = Runner(loaded, self.cache, self.encoder_cache, flash=flash)
        vocab_size = loaded.text_config.vocab_size
        self._grammars = Grammars(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.eos_token_ids, max_queued=self.max_waiting_requests
        )
        self._masks = StepMasks(vocab_size)
        self._texts = TokenTexts(tokenizer)
        self._warm_up()
        if flash and self.cuda_graphs:
            self.capture_decode_graphs(cuda_capture(torch.cuda.graph_pool_handle()))
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB), up to %d rows; prefix caching %s; "
            "linear layers on %s; attention: %s",
            self.cache.num_blocks - 1,
            block_size,
            self.scheduler.capacity_tokens,
            self.cache.num_blocks * self.cache.block_bytes / 1024**3,
            self.max_batch_size,
            "on" if self.prefix_caching else "off",
            "oneDNN (packed weights)" if self.runner.packed else "PyTorch",
            "flash-attn paged" if flash else "PyTorch SDPA over gathered blocks",
        )

    def capture_decode_graphs(self, capture: Capture) -> None:
        """Capture decode steps for every batch size up to the row limit (see ``graphs.py``), for rows
        as long as the longest prompt (a row that grows past that decodes eagerly)."""
        runner = self.runner
        runner.graphs = graphs = DecodeGraphs(
            runner.model,
            self.cache,
            max_rows=self.max_batch_size,
            max_blocks=min(self.cache.num_blocks - 1, self.scheduler.blocks_for(self.max_prompt_tokens)),
            capture=capture,
        )
        graphs.capture_all()

    def _build_cache(self, loaded: LoadedModel, block_size: int) -> KVCache:
        text = loaded.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = {
            "num_layers": text.num_hidden_layers,
            "block_size": block_size,
            "kv_heads": text.num_key_value_heads or text.num_attention_heads,  # as transformers fills it in
            "head_dim": head_dim,
        }
        block_bytes = KVCache.bytes_per_block(**shape, dtype=loaded.dtype)
        budget = self.kv_cache_bytes
        if budget is None and loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            budget = int(free * CUDA_KV_CACHE_FRACTION)
        num_blocks = (budget if budget is not None else CPU_KV_CACHE_BYTES) // block_bytes
        return KVCache(**shape, num_blocks=max(num_blocks, 2), dtype=loaded.dtype, device=loaded.device)

    def _warm_up(self) -> None:
        """One short text request and one with an image as large as requests may send through the whole
        loop before ``/health`` says ready: the first forward passes (and the image processor's first
        call) are several times slower than the rest, and the first large image's buffers are new memory
        the process must fault in (on the small benchmark checkpoint on CPU, the first 1024x768 image
        took about 0.1-0.2 s longer than the next); a user's first request should not pay for them."""
        started = time.perf_counter()
        # An image token covers 28x28 pixels; a small KV budget gets a smaller image (at most half of it).
        pixels = max(WARM_UP_MIN_PIXELS, min(self.max_image_pixels, self.scheduler.capacity_tokens // 2 * 28 * 28))
        side = int(pixels**0.5)
        image = Image.new("RGB", (side, side), (128, 128, 128))
        turns = [[ChatTurn("user", ["Warm up."])], [ChatTurn("user", [image, "Warm up."])]]
        prompts = [self.prompts.build(t, min_pixels=WARM_UP_MIN_PIXELS, max_pixels=pixels) for t in turns]
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        requests = [GenerationRequest(prompt=p, params=params) for p in prompts]
        for request in requests:
            self.scheduler.check_fits_alone(request)  # a budget too small for them is a start-up error, not a hang
        with torch.inference_mode():
            self._run_to_completion(requests)
        self.pool.queries = self.pool.hits = 0  # /metrics counts users' requests only
        self.encoder_cache.queries = self.encoder_cache.hits = 0
        log.info("warmed up in %.2f s", time.perf_counter() - started)

    def _run_to_completion(self, requests: list[GenerationRequest]) -> None:
        """Run start-up ``requests`` (unbound: their events go nowhere) through the loop until they
        end. Listeners do not hear of them: /metrics counts users' requests only."""
        listeners, self._listeners = self._listeners, []
        try:
            self.scheduler.waiting.extend(requests)
            while not all(r.is_done for r in requests):
                self._step()
        finally:
            self._listeners = listeners

    def _wait_for_work(self) -> bool:
        """Block until there is work (True) or the engine stops (False)."""
        with self._cond:
            while not (self.scheduler.has_work or self._stopping):
                self._cond.wait()
            if self._stopping:
                return False
            if not self.scheduler.running and self.batch_wait_s > 0:
                self._wait_for_companions()
            self.scheduler.drop_cancelled()
            return True

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

    def _step(self) -> None:
        """One iteration: schedule -> run -> postprocess."""
        self._end_cancelled()
        with self._cond:  # the waiting list is shared with the event loop
            plan = self.scheduler.schedule(self._row)
        if plan.rows:
            self._run(plan)
        self._retire()
        self.peak_blocks_used = max(self.peak_blocks_used, self.pool.num_used)
        self._kv_cache_usage = self.pool.usage

    def _row(self, request: GenerationRequest) -> Row:
        loaded = self.loaded
        return Row(
            request,
            tokenizer=loaded.processor.tokenizer,
            eos_token_ids=self.eos_token_ids,
            vocab_size=loaded.text_config.vocab_size,
            device=loaded.device,
            image_token_id=loaded.model.config.image_token_id,
            video_token_id=loaded.model.config.video_token_id,
            texts=self._texts,
        )

    def _run(self, plan: StepPlan) -> None:
        """Run the plan and sample; a failure (a bug, an out-of-memory) fails the plan's rows, and the
        engine goes on serving the others."""
        now = time.perf_counter()
        budget = self.scheduler.max_prefill_tokens
        for scheduled in plan.rows:
            row = scheduled.row
            row.start(now)
            self.prefill_chunks_run += row.computed < row.prompt_tokens and row.prompt_tokens > budget
        self.cache.ensure_zeroed(self.pool.high_water)
        try:
            step = self.runner.execute(plan)
            rows, sampled = step.rows, StepTokens([], [])
            if step.logits is not None:  # some rows sample
                grammars = [row.grammar for row in rows]
                constrain = partial(self.masks.apply, grammars=grammars) if any(grammars) else None
                sampled = next_tokens(step.logits, [row.sampler for row in rows], constrain=constrain)
        except Exception as exc:
            log.exception("a step failed for %d rows", len(plan.rows))
            failed = [scheduled.row for scheduled in plan.rows]
            self.scheduler.fail_rows(failed)
            self._fail([row.request for row in failed], exc)
            return
        for row, first, scores in step.prompt_scores:
            row.add_prompt_scores(first, scores)
        for scheduled in plan.rows:
            self.scheduler.computed(scheduled)
        now = time.perf_counter()
        outbox = Outbox()
        for scheduled in plan.rows:
            scheduled.row.prompt_computed(outbox)  # prompt logprobs out; a row that only scores its prompt ends
        for row, token, scored in zip(rows, sampled.tokens, sampled.logprobs):
            row.accept(token, outbox, now, scored)
        outbox.flush()

    def _end_cancelled(self) -> None:
        outbox = Outbox()
        for row in [*self.scheduler.running, *self.scheduler.preempted]:
            if not row.done and row.request.cancel_requested:
                row.end(FinishReason.CANCELLED, outbox)
        outbox.flush()

    def _fail(self, requests: list[GenerationRequest], exc: Exception) -> None:
        for request in requests:
            if not request.is_done:
                request.fail(exc)
            self._notify_listeners(request)

    def _fail_all(self, exc: Exception) -> None:
        """Fail every row (a step failed outside the forward pass, in the engine's own bookkeeping)."""
        rows = [*self.scheduler.running, *self.scheduler.preempted]
        self.scheduler.fail_rows(rows)
        self.scheduler.preempted = []
        self._fail([row.request for row in rows], exc)

    def _retire(self) -> None:
        for row in self.scheduler.retire():
            self._notify_listeners(row.request)

    def _end_running(self) -> None:
        """Stopping: running and preempted rows end as cancelled (their clients see a shutdown)."""
        outbox = Outbox()
        for row in [*self.scheduler.running, *self.scheduler.preempted]:
            if not row.done:
                row.end(FinishReason.CANCELLED, outbox)
        outbox.flush()
        self._retire()
