"""How the benchmark sends its load and times it.

* ``engine_load``: N requests from ``concurrency`` closed-loop clients through an in-process
  ``Engine`` (``build_prompt`` -> ``submit`` -> events), each timed from the client's side;
* ``http_load``: the same over HTTP, to ``/v1/chat/completions`` (SSE) or, on a server without it,
  the form endpoint ``/infer/text`` / ``/infer/image`` with ``stream=true``;
* ``engine_sender`` / ``http_sender``: one request at a time, for workloads that decide themselves
  when each is sent (open loop, head-of-line).

The ceilings, with no engine at all, are in ``ceilings.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import torch

from bench.engine import Engine
from bench.report import RequestTiming
from bench.sse import ChatStreamReader
from bench.workload import Workload
from snark.errors import ConfigError
from snark.values import ChatTurn, SamplingParams


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


DEFAULT_PIXELS = (4 * 28 * 28, 1280 * 28 * 28)  # the server's default image bounds
REQUEST_TIMEOUT_S = 600.0


async def engine_send(
    engine: Engine, workload: Workload, index: int, params: SamplingParams, pixels: tuple[int, int] = DEFAULT_PIXELS
) -> RequestTiming:
    """Timed from before the prompt is built (images are preprocessed per request, as in the
    server) to the final event; each text event is a token (or a few, held back mid-character)."""
    sent = time.perf_counter()
    prompt = await engine.build_prompt(chat_turns(workload, index), min_pixels=pixels[0], max_pixels=pixels[1])
    request = engine.submit(prompt, params)
    chunk_times = []
    async for event in request.events():
        if event.text:
            chunk_times.append(time.perf_counter())
    first = chunk_times[0] if chunk_times else None
    return RequestTiming(
        sent, first, time.perf_counter(), request.completion_tokens, chunk_times, max_tokens=params.max_new_tokens
    )


def engine_load(
    engine: Engine,
    workload: Workload,
    params: SamplingParams,
    *,
    requests: int,
    concurrency: int,
    pixels: tuple[int, int] = DEFAULT_PIXELS,
) -> tuple[list[RequestTiming], float]:
    return asyncio.run(
        closed_loop(
            lambda index: engine_send(engine, workload, index, params, pixels),
            requests=requests,
            concurrency=concurrency,
        )
    )


# --- HTTP ---------------------------------------------------------------------------------------
class HttpTarget:
    """A running server: the OpenAI route when it has one, else the form endpoints."""

    def __init__(
        self,
        url: str,
        *,
        count_tokens: Callable[[str], int] | None = None,
        stream: bool = True,
        model: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.stream = stream  # False: one JSON reply per request (no TTFT), as most API clients use it
        self.count_tokens = count_tokens  # for the form endpoints, which report no usage
        self.model, self.openai = model, True
        if model is None:  # the server's first model, as OpenAI clients find it
            try:
                reply = httpx.get(f"{self.url}/v1/models", timeout=30)
            except httpx.HTTPError as exc:
                raise ConfigError(f"cannot reach {self.url}: {exc}") from exc
            self.openai = reply.status_code == 200
            self.model = reply.json()["data"][0]["id"] if self.openai else None

    @property
    def api(self) -> str:
        route = "/v1/chat/completions" if self.openai else "/infer/text|image (form)"
        return f"{route} {'streamed' if self.stream else 'JSON'}"

    async def send(self, client: httpx.AsyncClient, workload: Workload, index: int, max_tokens: int) -> RequestTiming:
        sent = time.perf_counter()
        chunk_times, tokens = (
            (await self._openai(client, workload, index, max_tokens))
            if self.openai
            else (await self._form(client, workload, index, max_tokens))
        )
        first = chunk_times[0] if chunk_times else None
        return RequestTiming(sent, first, time.perf_counter(), tokens, chunk_times, max_tokens=max_tokens)

    async def _openai(self, client, workload: Workload, index: int, max_tokens: int) -> tuple[list[float], int]:
        content: list[dict] = [{"type": "text", "text": workload.prompts[index]}]
        if workload.image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": workload.image_data_uri}})
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
            raise_for_status(reply)
            return [], reply.json()["usage"]["completion_tokens"]
        body["stream_options"] = {"include_usage": True}
        reader = await stream_chat(client, self.url, body)
        return reader.content_times, reader.completion_tokens

    async def _form(self, client, workload: Workload, index: int, max_tokens: int) -> tuple[list[float], int]:
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
        chunk_times, text = [], ""
        async with client.stream("POST", f"{self.url}{route}", data=data, files=files) as reply:
            if reply.is_error:
                await reply.aread()
            raise_for_status(reply)
            async for chunk in reply.aiter_text():
                if chunk:
                    chunk_times.append(time.perf_counter())
                text += chunk
        return chunk_times, self.count_tokens(text)  # no usage here, and the row may stop at end-of-turn


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> ChatStreamReader:
    """POST a streamed chat completion to ``url`` and read its SSE lines as they arrive."""
    reader = ChatStreamReader()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        if reply.is_error:
            await reply.aread()
        raise_for_status(reply)
        async for line in reply.aiter_lines():
            reader.feed(line, time.perf_counter())
    return reader


def raise_for_status(reply: httpx.Response) -> None:
    """Like ``raise_for_status``, with the server's own message (a 400 says what to fix)."""
    if reply.is_error:
        raise RuntimeError(f"{reply.request.method} {reply.request.url}: HTTP {reply.status_code}: {reply.text[:300]}")


def http_load(
    target: HttpTarget, workload: Workload, max_tokens: int, *, requests: int, concurrency: int
) -> tuple[list[RequestTiming], float]:
    async def run():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:
            return await closed_loop(
                lambda index: target.send(client, workload, index, max_tokens),
                requests=requests,
                concurrency=concurrency,
            )

    return asyncio.run(run())


# --- one request at a time ----------------------------------------------------------------------
Send = Callable[[int, int], Awaitable[RequestTiming]]  # (prompt index, max_tokens) -> that request's timing


async def send_or_record_failure(send: Send, index: int, max_tokens: int) -> RequestTiming:
    """``send``, with a failure kept as a timing that says what went wrong: a refused request (an
    overloaded server's 503) is one of the run's results, not the end of the run."""
    started = time.perf_counter()
    try:
        return await send(index, max_tokens)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, whatever the server or engine raised
        error = f"{type(exc).__name__}: {exc}"[:300]
        return RequestTiming(started, None, time.perf_counter(), 0, max_tokens=max_tokens, error=error)


@contextlib.asynccontextmanager
async def engine_sender(engine: Engine, workload: Workload, pixels: tuple[int, int]) -> AsyncIterator[Send]:
    async def send(index: int, max_tokens: int) -> RequestTiming:
        params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
        # The HTTP client's limit too: an engine whose worker died fails the run instead of hanging it.
        return await asyncio.wait_for(engine_send(engine, workload, index, params, pixels), REQUEST_TIMEOUT_S)

    yield send


@contextlib.asynccontextmanager
async def http_sender(target: HttpTarget, workload: Workload) -> AsyncIterator[Send]:
    # No cap on connections: an open loop sends when its schedule says, however many are in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:
        yield lambda index, max_tokens: target.send(client, workload, index, max_tokens)
