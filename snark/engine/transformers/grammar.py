"""Constrained decoding for Snark's engine: grammars compiled off the generation thread, one
matcher per constrained row, and the step's token masks.

    Engine.prepare ──► Grammars.compile (a worker thread; compiled grammars cached by spec)
    admit ──► RowGrammar (a matcher at the grammar's start)
    each step: fill the constrained rows' bitmasks ──► mask their logits ──► sample ──► accept

xgrammar does the work (vLLM and SGLang use it too): a compiled grammar knows, for every state,
which of the 152k tokens may come next, so a step costs a bitmask per constrained row, not a scan
of the vocabulary. Compiling releases the GIL, so the event loop and the generation thread go on
while it runs; the schema limits (``snark.structured.schema``) bound how long a compile can take,
since a running compile cannot be interrupted. Free rows share the batch and pay nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import xgrammar

from snark.errors import Overloaded
from snark.structured.constraint import grammar_of, schema_error
from snark.values import StructuredOutput

log = logging.getLogger(__name__)
_NEG_INF = torch.tensor(float("-inf"))

# Compiled grammars kept, least recently used dropped first. A grammar holds token masks for the
# whole vocabulary: ~0.1 MB for any JSON object, ~8 MB for a receipt-sized schema (Qwen2's 152k tokens).
CACHED_GRAMMAR_BYTES = 512 * 1024**2
COMPILE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))  # half the cores: generation goes on beside it


class Grammars:
    """Compiles ``StructuredOutput``s for one tokenizer, one at a time, in its own thread."""

    def __init__(self, tokenizer, *, vocab_size: int, stop_token_ids: Iterable[int], max_queued: int) -> None:
        self._tokenizer = tokenizer
        self.max_queued = max_queued  # compiles waiting for the grammar thread; past it, 503
        self.vocab_size = vocab_size  # the model's logits width (the tokenizer's size, padded)
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None  # built with the first grammar (~0.6 s)
        # One future per spec, compiled or compiling: requests with a schema already on its way wait
        # for that compile instead of queueing their own.
        self._cache: OrderedDict[tuple[str, str], Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._lock = threading.RLock()  # a compile that ends at once settles inside compile()'s lock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snark-grammar")

    async def compile(self, structure: StructuredOutput) -> xgrammar.CompiledGrammar:
        key = (structure.kind, structure.spec)
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                queued = sum(1 for f in self._cache.values() if not f.done())
                if queued >= self.max_queued:
                    raise Overloaded(
                        f"{queued} new output schemas are already waiting to be compiled (SNARK_MAX_WAITING_REQUESTS); "
                        "retry shortly. A schema compiled once is cached.",
                        retry_after_s=2,
                    )
                future = self._cache[key] = self._pool.submit(self._compile, structure)
                self._cache.move_to_end(key)
                future.add_done_callback(partial(self._settle, key))
            else:
                self._cache.move_to_end(key)
        # Shielded: a request that gives up (client gone, shutdown) must not cancel a compile that other
        # requests with the same schema wait for.
        return await asyncio.shield(asyncio.wrap_future(future))

    def _settle(self, key: tuple[str, str], done: Future[xgrammar.CompiledGrammar]) -> None:
        """A compile ended: forget a failed one (the next request gets the same 400 anew), and keep
        the cache within its bytes."""
        with self._lock:
            if done.cancelled() or done.exception() is not None:
                self._cache.pop(key, None)
                return
            held = sum(f.result().memory_size_bytes for f in self._cache.values() if f.done() and not f.exception())
            for old in list(self._cache):
                if held <= CACHED_GRAMMAR_BYTES or old == key:
                    break
                dropped = self._cache[old]
                if dropped.done():
                    held -= dropped.result().memory_size_bytes if dropped.exception() is None else 0
                    del self._cache[old]

    def _compile(self, structure: StructuredOutput) -> xgrammar.CompiledGrammar:
        started = time.perf_counter()
        compiled = self._compile_now(structure)
        log.info("compiled a %s grammar in %.2f s", structure.kind, time.perf_counter() - started)
        return compiled

    def _compile_now(self, structure: StructuredOutput) -> xgrammar.CompiledGrammar:
        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
            )
            # xgrammar's own cache also shares token masks between grammars with equal parts (a
            # maxLength 24 string, an integer range): a schema like one compiled before takes ~10 ms, not
            # the ~2 s of its first compile.
            self._compiler = xgrammar.GrammarCompiler(
                info, max_threads=COMPILE_THREADS, cache_enabled=True, cache_limit_bytes=CACHED_GRAMMAR_BYTES
            )
        kind, text = grammar_of(structure)
        try:
            if kind == "grammar":
                return self._compiler.compile_grammar(text)
            return self._compiler.compile_structural_tag(text)
        except RuntimeError as exc:  # xgrammar's message names the part of the schema it cannot take
            raise schema_error(exc) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RowGrammar:
    """One constrained row's place in its grammar."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.matcher = xgrammar.GrammarMatcher(compiled)

    @classmethod
    def of(cls, structure: StructuredOutput) -> RowGrammar:
        """A matcher at the start of the grammar this engine's ``prepare`` compiled for ``structure``."""
        compiled = structure.compiled
        if not isinstance(compiled, xgrammar.CompiledGrammar):
            raise TypeError(f"the request's output grammar was not compiled by this engine: {type(compiled).__name__}")
        return cls(compiled)

    def accept(self, token: int) -> bool:
        """Move on by ``token``; False if the grammar refuses it (it came from this row's own mask,
        so only a bug gets here)."""
        return self.matcher.accept_token(token)


class StepMasks:
    """The bitmasks of one step's constrained rows: reused from step to step, grown when needed."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)  # [rows, vocab / 32] int32
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=1)

    def apply(self, logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> None:
        """Forbid, in ``logits`` ([rows, vocab] float32, on the CPU or the GPU), every token each
        constrained row's grammar does not allow next. Unconstrained rows (None) are left alone."""
        rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
        if not rows:
            return
        matchers = [grammar.matcher for grammar in grammars if grammar is not None]  # in the order of rows
        if self._bitmask.shape[0] < len(grammars):  # bitmask rows line up with logits rows
            self._bitmask = xgrammar.allocate_token_bitmask(
                max(len(grammars), 2 * self._bitmask.shape[0]), self.vocab_size
            )
        bitmask = self._bitmask[: len(grammars)]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        if logits.device.type == "cpu":
            _forbid_on_cpu(logits, bitmask, rows)
        else:  # xgrammar's own kernel on the GPU
            xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def _forbid_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """``logits[rows]`` = -inf where ``bitmask`` has a 0 bit. xgrammar's CPU kernel writes forbidden
    tokens one by one (~0.8 ms a row where few are allowed, as after a key); unpacking the bits and one
    ``where`` costs ~0.08 ms a row whatever the mask."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask[rows].numpy().view(np.uint8), axis=-1, count=vocab, bitorder="little")
    allowed = torch.from_numpy(bits).view(torch.bool)  # [len(rows), vocab]
    if len(rows) == logits.shape[0]:
        torch.where(allowed, logits, _NEG_INF, out=logits)
    else:
        logits[rows] = torch.where(allowed, logits[rows], _NEG_INF)
