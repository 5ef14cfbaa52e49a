"""The engine seam: what routes may ask of an engine, whichever one runs behind it.

Routes build a prompt, submit it, and follow its events; they never see a model, a KV cache or a
scheduler. Two engines implement this interface: Snark's own continuous-batching loop on a Hugging
Face model (``snark.engine.transformers``) and vLLM's async engine (``snark.engine.vllm``).

    build_prompt(turns) ──► submit(prompt, params) ──► follow(request) ──► StreamEvent ... final
    prompt_from_ids(ids) ─┘                        └──► cancel(request)   (client gone, timeout)

The shared parts live here: the lifecycle states, the model facts ``/health`` reports, the
listeners that feed ``/metrics``, and ``follow``/``generate``, which are the same for every engine
because every engine reports through ``GenerationRequest.push``.
"""

from __future__ import annotations

import abc
import enum
import gc
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snark.engine.request import GenerationRequest, PromptInputs, StreamEvent
from snark.values import ChatTurn, SamplingParams, ToolSpec

if TYPE_CHECKING:
    from snark.engine.prompt import PromptBuilder

log = logging.getLogger(__name__)

SHUTTING_DOWN = "The server is shutting down; retry on another replica."
STILL_LOADING = "The model is still loading: retry when GET /health answers 200."


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ModelFacts:
    """What ``/health`` and ``/v1/models`` say about the served model."""

    name: str  # what the API reports as "model"
    engine: str  # "transformers" | "vllm"
    device: str
    dtype: str
    attention: str
    is_tiny: bool


class Engine(abc.ABC):
    """One model behind one queue. Subclasses load the model in ``start`` (not in ``__init__``),
    and report each request's events through ``GenerationRequest.push``/``finish``/``fail``."""

    name: str = "engine"
    thread_name: str = "snark-engine"
    still_loading: str = "the model is still loading"  # what wait_ready says when it times out

    def __init__(self, *, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None
        self.default_sampling = SamplingParams()  # the model's own defaults, once it is loaded
        self._listeners: list[Callable[[GenerationRequest], None]] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # set once the model is loaded or its load failed

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, on_load_failed: Callable[[BaseException], None] | None = None) -> None:
        """Start the engine's thread (``_main``): it loads the model, then serves. Returns at once."""
        self._thread = threading.Thread(target=self._main, args=(on_load_failed,), name=self.thread_name, daemon=True)
        self._thread.start()

    @abc.abstractmethod
    def _main(self, on_load_failed: Callable[[BaseException], None] | None) -> None:
        """The engine's thread: load (setting ``_ready`` and ``load_error``), then serve until stopped."""

    def _loaded(self) -> None:
        """Called by ``_main`` once the model serves: ``wait_ready`` and ``/health`` say ready."""
        # The start-up heap (torch, transformers, the model's modules; vLLM's) never becomes garbage: frozen,
        # the collector's full passes skip it, and the pauses they put into every stream stay short (vLLM's
        # own server does the same).
        gc.collect()
        gc.freeze()
        self.state = EngineState.READY
        self._ready.set()

    def _load_failed(self, exc: BaseException, on_load_failed: Callable[[BaseException], None] | None) -> None:
        """Called by ``_main`` when loading raised: reported to /health, ``wait_ready``, the log and
        ``on_load_failed`` (which by default stops the process)."""
        self.load_error = exc
        self.state = EngineState.FAILED
        self._ready.set()
        log.error("%s engine failed to load the model: %s", self.name, exc)
        if on_load_failed is not None:
            on_load_failed(exc)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the model is loaded; re-raise the load error if it failed."""
        self._ready.wait(timeout_s)
        if self.load_error is not None:
            raise self.load_error
        if self.state is not EngineState.READY:
            raise TimeoutError(self.still_loading)

    @abc.abstractmethod
    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, end what is queued or running, release the model."""

    @property
    def started(self) -> bool:
        return self._thread is not None

    # --- facts ------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def facts(self) -> ModelFacts | None:
        """The loaded model's facts; None until it is loaded."""

    @property
    def model_name(self) -> str:
        facts = self.facts
        return facts.name if facts else "loading"

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_running(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float:
        """The share (0 to 1) of the KV cache budget that running requests hold; 0 where unknown."""
        return 0.0

    @property
    def cache_counts(self) -> dict[str, tuple[int, int]] | None:
        """Lookups and hits of the engine's caches (``prefix``: prompt tokens; ``mm``: images), for
        /metrics; None where the engine does not report them."""
        return None

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve (load failed, stopped, or its worker died)."""
        return self.state is EngineState.READY

    # --- requests ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def build_prompt(
        self, turns: list[ChatTurn], *, min_pixels: int, max_pixels: int, tools: Sequence[ToolSpec] = ()
    ) -> PromptInputs:
        """Tokenize ``turns`` (and preprocess images) off the event loop; ``tools`` are described to
        the model in the system turn. Raises ``InvalidRequest``."""

    async def prepare(self, params: SamplingParams) -> SamplingParams:
        """``params`` ready to submit: what the engine must do before a request can join a batch (its
        output grammar: Snark's engine compiles it, vLLM's gets its text), done off the event loop and
        off the generation thread. Raises ``InvalidRequest`` for a constraint the engine cannot take."""
        return params

    @staticmethod
    def _require_prepared(params: SamplingParams) -> None:
        if params.structure is not None and params.structure.compiled is None:
            raise ValueError("a constrained request must go through prepare() before submit()")

    # --- raw prompts: no chat template (/v1/completions, /tokenize, /detokenize) -----------------------
    @abc.abstractmethod
    def _text_prompts(self) -> PromptBuilder:
        """The loaded model's prompt builder (its tokenizer and prompt limit). Raises ``ModelNotReady``
        while the model loads and ``ShuttingDown`` once the engine stops."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """The longest sequence, prompt and answer together, one request can hold."""

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, its special tokens (``<|im_start|>``) read as such."""
        return self._text_prompts().tokenize(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: Sequence[int], *, param: str = "tokens") -> str:
        """The text of ``ids``. Raises ``InvalidRequest`` naming ``param`` for an id outside the vocabulary."""
        return self._text_prompts().detokenize(ids, param=param)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it."""
        return self._text_prompts().token_strings(ids)

    def prompt_from_ids(self, ids: Sequence[int], *, param: str = "prompt") -> PromptInputs:
        """A prompt of token ids as they are, without a chat template, ready to ``submit``. Raises
        ``InvalidRequest`` naming ``param`` as chat would: an id outside the vocabulary, a media
        placeholder, an empty prompt or one over the prompt limit."""
        return self._text_prompts().from_ids(ids, param=param)

    # --- requests, continued -------------------------------------------------------------------------
    #: Whether requests submitted together share their common prompt prefix in the prefix cache (vLLM
    #: caches a block as soon as a step schedules it). Snark's engine caches a block once it is computed,
    #: so the choices of one prompt (``n``) follow the first once its prompt is prefilled.
    shares_prefill_when_submitted_together: bool = False

    @abc.abstractmethod
    def submit(self, prompt: PromptInputs, params: SamplingParams, *, deliver_deltas: bool = True) -> GenerationRequest:
        """Queue a request; its events arrive on the calling event loop. Raises ``Overloaded``,
        ``ModelNotReady``, or ``InvalidRequest`` for a request that can never fit."""

    @abc.abstractmethod
    def cancel(self, request: GenerationRequest) -> None:
        """Stop ``request`` if it is still live; a no-op for a finished one."""

    async def follow(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yield a submitted request's events. Leaving the loop early (client gone, timeout) cancels it.
        Routes submit first, then follow: a full queue then raises ``Overloaded`` while they can still
        answer 503, not inside a stream that has already started."""
        try:
            async for event in request.events():
                yield event
        finally:
            self.cancel(request)

    async def run_to_completion(self, prompt: PromptInputs, params: SamplingParams) -> GenerationRequest:
        """Run to completion and return the finished request (text, counts, timing)."""
        request = self.submit(prompt, params, deliver_deltas=False)
        try:
            async for _ in request.events():
                pass
        finally:
            self.cancel(request)
        return request

    # --- metrics hook -----------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[GenerationRequest], None]) -> None:
        """``listener(request)`` runs (in the engine's thread) when a request that ran ends."""
        self._listeners.append(listener)

    def _notify_listeners(self, request: GenerationRequest) -> None:
        for listener in self._listeners:
            try:
                listener(request)
            except Exception:
                log.exception("engine listener failed")
