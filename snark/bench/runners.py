"""How the benchmark sends its load and times it.

* ``engine_load``: N requests from ``concurrency`` closed-loop clients through an in-process
  ``Engine`` (``build_prompt`` -> ``submit`` -> events), each timed from the client's side;
* ``http_load``: the same over HTTP, to ``/v1/chat/completions`` (SSE) or, on a server without it,
  the form endpoint ``/infer/text`` / ``/infer/image`` with ``stream=true``;
* ``raw_generate``: one left-padded ``model.generate`` call, no engine at all: the ceiling;
* ``continuous_batching``: transformers' ``generate_batch`` on token ids (text only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import resource
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import torch
from transformers import GenerationConfig

from snark.bench.report import RequestTiming
from snark.bench.workload import Workload
from snark.engine.batching import collate
from snark.engine.engine import Engine
from snark.engine.loader import LoadedModel
from snark.engine.request import ChatTurn, PromptInputs, SamplingParams


# --- memory -------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS so far (Linux reports
    it in KiB; it cannot be reset, so it only grows across rows)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


# --- closed-loop load ---------------------------------------------------------------------------
async def closed_loop(
    send: Callable[[int], Awaitable[RequestTiming]], *, requests: int, concurrency: int
) -> tuple[list[RequestTiming], float]:
    """``concurrency`` clients, each sending its next request as soon as its last one ended."""
    indices = itertools.count()
    timings: list[RequestTiming] = []

    async def client() -> None:
        while (index := next(indices)) < requests:
            timings.append(await send(index))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - started


def chat_turns(workload: Workload, index: int) -> list[ChatTurn]:
    parts = ([workload.image] if workload.image is not None else []) + [workload.prompts[index]]
    return [ChatTurn("user", parts)]


def engine_load(
    engine: Engine,
    workload: Workload,
    params: SamplingParams,
    *,
    requests: int,
    concurrency: int,
    pixels: tuple[int, int] = (4 * 28 * 28, 1280 * 28 * 28),  # the server's default image bounds
) -> tuple[list[RequestTiming], float]:
    """Each request is timed from before its prompt is built (images are preprocessed per request,
    as in the server) to its final event; its first text event is its first token."""

    async def send(index: int) -> RequestTiming:
        sent = time.perf_counter()
        prompt = await engine.build_prompt(chat_turns(workload, index), min_pixels=pixels[0], max_pixels=pixels[1])
        request = engine.submit(prompt, params)
        first = None
        async for event in request.events():
            if event.text and first is None:
                first = time.perf_counter()
        return RequestTiming(sent, first, time.perf_counter(), request.completion_tokens)

    return asyncio.run(closed_loop(send, requests=requests, concurrency=concurrency))


# --- HTTP ---------------------------------------------------------------------------------------
class HttpTarget:
    """A running server: the OpenAI route when it has one, else the form endpoints."""

    def __init__(self, url: str, *, count_tokens: Callable[[str], int], stream: bool = True) -> None:
        self.url = url.rstrip("/")
        self.stream = stream  # False: one JSON reply per request (no TTFT), as most API clients use it
        self.count_tokens = count_tokens  # for the form endpoints, which report no usage
        reply = httpx.get(f"{self.url}/v1/models", timeout=30)
        self.openai = reply.status_code == 200
        self.model = reply.json()["data"][0]["id"] if self.openai else None

    @property
    def api(self) -> str:
        route = "/v1/chat/completions" if self.openai else "/infer/text|image (form)"
        return f"{route} {'streamed' if self.stream else 'JSON'}"

    async def send(self, client: httpx.AsyncClient, workload: Workload, index: int, max_tokens: int) -> RequestTiming:
        sent = time.perf_counter()
        first, tokens = (
            (await self._openai(client, workload, index, max_tokens))
            if self.openai
            else (await self._form(client, workload, index, max_tokens))
        )
        return RequestTiming(sent, first, time.perf_counter(), tokens)

    async def _openai(self, client, workload: Workload, index: int, max_tokens: int) -> tuple[float | None, int]:
        content: list[dict] = [{"type": "text", "text": workload.prompts[index]}]
        if workload.image is not None:
            uri = "data:image/jpeg;base64," + base64.b64encode(workload.image_jpeg()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": self.stream,
            "ignore_eos": True,  # vLLM's extension: fixed output lengths
        }
        if not self.stream:
            reply = await client.post(f"{self.url}/v1/chat/completions", json=body)
            reply.raise_for_status()
            return None, reply.json()["usage"]["completion_tokens"]
        body["stream_options"] = {"include_usage": True}
        first, tokens = None, 0
        async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"server error mid-stream: {chunk['error']}")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return first, tokens

    async def _form(self, client, workload: Workload, index: int, max_tokens: int) -> tuple[float | None, int]:
        data = {
            "prompt": workload.prompts[index],
            "max_new_tokens": str(max_tokens),
            "temperature": "0",
            "stream": "true" if self.stream else "false",
            "response_format": "text",
        }
        files = (
            {"image_file": ("image.jpg", workload.image_jpeg(), "image/jpeg")} if workload.image is not None else None
        )
        route = "/infer/image" if files else "/infer/text"
        first, text = None, ""
        async with client.stream("POST", f"{self.url}{route}", data=data, files=files) as reply:
            reply.raise_for_status()
            async for chunk in reply.aiter_text():
                if chunk and first is None:
                    first = time.perf_counter()
                text += chunk
        return first, self.count_tokens(text)  # no usage here, and the row may stop at end-of-turn


def http_load(
    target: HttpTarget, workload: Workload, max_tokens: int, *, requests: int, concurrency: int
) -> tuple[list[RequestTiming], float]:
    async def run():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            return await closed_loop(
                lambda index: target.send(client, workload, index, max_tokens),
                requests=requests,
                concurrency=concurrency,
            )

    return asyncio.run(run())


@contextlib.contextmanager
def local_server(app) -> Iterator[str]:
    """``app`` under a real uvicorn on 127.0.0.1 in a thread of this process; yields its URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


# --- the ceilings -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_generate(loaded: LoadedModel, prompts: list[PromptInputs], *, max_new_tokens: int, pad_token_id: int) -> float:
    """Seconds for one ``model.generate`` over ``prompts`` as a left-padded batch, exactly
    ``max_new_tokens`` each. End-of-turn is switched off by giving no end-of-turn ids, which costs
    nothing per step (``min_new_tokens`` would check the whole vocabulary every step and slow this
    ceiling down)."""
    inputs = collate(prompts, pad_token_id=pad_token_id, image_token_id=loaded.model.config.image_token_id)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=pad_token_id
    )
    _sync(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, generation_config=config)
    _sync(loaded.device)
    seconds = time.perf_counter() - started
    if out.shape[1] - inputs["input_ids"].shape[1] != max_new_tokens:
        raise RuntimeError("raw generate did not produce max_new_tokens tokens per row")
    return seconds


def continuous_batching(
    loaded: LoadedModel, prompts: list[PromptInputs], *, max_new_tokens: int, pad_token_id: int
) -> tuple[float, int]:
    """transformers' own continuous batching (``generate_batch``) on the prompts' token ids: text
    only, as it takes no images. The first call builds and warms its manager, which is kept for
    the timed second call, then destroyed. Returns (seconds, output tokens)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id
    )
    ids = [p.input_ids for p in prompts]
    try:
        loaded.model.generate_batch(inputs=ids, generation_config=config, persistent_manager=True)
        _sync(loaded.device)
        started = time.perf_counter()
        outputs = loaded.model.generate_batch(inputs=ids, generation_config=config, persistent_manager=True)
        _sync(loaded.device)
        seconds = time.perf_counter() - started
    finally:
        loaded.model.destroy_cached_continuous_batching_manager()
    return seconds, sum(len(o.generated_tokens) for o in outputs.values())
