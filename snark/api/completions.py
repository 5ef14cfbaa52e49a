"""``POST /v1/completions``: OpenAI's completions API, for evaluation harnesses and older clients.

A raw prompt, with no chat template: a text, a list of texts, token ids, or a list of token-id lists.
Each prompt gets ``n`` choices, numbered ``prompt_index * n + i`` as OpenAI numbers them (``choices``).
``echo`` puts the prompt before its answers; with ``logprobs`` the prompt's tokens get their
log-probabilities too, the first none (lm-evaluation-harness scores multiple-choice answers so), and
``max_tokens=0`` with ``echo`` scores the prompt without generating. Response bodies are built in
``completion_replies``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from pydantic.json_schema import JsonDict
from starlette.background import BackgroundTask

from snark.api.cancellation import until_disconnected
from snark.api.choices import Choices
from snark.api.completion_replies import Answer, CompletionReply, Echo, completion_events
from snark.api.lenient import Lenient
from snark.api.openapi import up_to
from snark.api.protocol import StreamOptions
from snark.api.replies import sse_stream
from snark.api.sampling import refuse_stop_beside, resolve_sampling, stop_strings
from snark.api.state import AppState, get_state
from snark.api.streaming import STREAM_HEADERS
from snark.api.tools_and_formats import ResponseFormat, response_format_output
from snark.config import Settings
from snark.engine.base import Engine
from snark.engine.request import PromptInputs
from snark.errors import InvalidRequest
from snark.values import SamplingParams

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows


_TEXT: JsonDict = {"type": "string", "minLength": 1}
_ID: JsonDict = {"type": "integer", "minimum": 0}


def _non_empty_list(items: JsonDict) -> JsonDict:
    return {"type": "array", "items": items, "minItems": 1}


class CompletionRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility; Snark serves one model.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists; no chat template is applied.",
        json_schema_extra={
            "anyOf": [_TEXT, _non_empty_list(_TEXT), _non_empty_list(_ID), _non_empty_list(_non_empty_list(_ID))]
        },
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Default: OpenAI's 16, or the server's limit if lower; 0 with echo scores the prompt only.",
        json_schema_extra=up_to("max_new_tokens_limit"),
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default: the model's.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no top-k cut (vLLM extension).")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Choice i samples with seed + i.")
    stop: str | list[str] | None = Field(
        None,
        description="Up to 16 strings; the answer ends before the first.",
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                {"type": "null"},
            ]
        },
    )
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="HF-style (vLLM extension).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="Run to max_tokens past end-of-turn (vLLM extension).")
    n: int = Field(1, ge=1, description="Choices per prompt, at most SNARK_MAX_N.", json_schema_extra=up_to("max_n"))
    echo: bool = Field(False, description="Put the prompt before each answer (and its tokens in logprobs).")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"0 to {MAX_LOGPROBS}: each token's log-probability and this many alternatives.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema with a schema.")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="As chat (vLLM extension).")
    # Refused when they ask for something Snark does not do:
    suffix: str | None = Field(None, json_schema_extra={"anyOf": [{"type": "null"}]})
    best_of: int | None = None
    logit_bias: dict[str, float] | None = Field(
        None, json_schema_extra={"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}
    )

    def check_supported(self, settings: Settings) -> None:
        """Raise ``InvalidRequest`` naming the field for what Snark cannot honour."""
        if self.suffix:
            raise InvalidRequest(
                "suffix (text after the insertion point) is not supported: Qwen2.5-VL has no fill-in-the-middle "
                "mode; leave suffix unset.",
                param="suffix",
                code="unsupported_parameter",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest(
                f"best_of={self.best_of} is not supported: Snark returns every choice it generates; send n "
                "instead (best_of equal to n, or unset).",
                param="best_of",
                code="unsupported_parameter",
            )
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by Snark: leave it unset.", param="logit_bias")
        if self.n > settings.max_n:
            raise InvalidRequest(
                f"n={self.n} is over this server's limit of {settings.max_n} choices (SNARK_MAX_N): ask for fewer.",
                param="n",
            )
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:
            raise InvalidRequest(
                f"logprobs={self.logprobs}: ask for at most {MAX_LOGPROBS} alternatives per token.", param="logprobs"
            )
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "max_tokens=0 generates nothing: send echo=true with it to score the prompt (and logprobs for "
                "its tokens' log-probabilities), or ask for at least 1 token.",
                param="max_tokens",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true.", param="stream_options")

    @property
    def scores_only(self) -> bool:
        """``max_tokens=0``: the prompt is echoed (and scored), nothing is generated."""
        return self.max_tokens == 0

    def token_prompts(self, engine: Engine) -> list[tuple[str | None, list[int]]]:
        """Each prompt as (its text when sent as text, its token ids). CPU work: call it off the loop."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [(prompt, engine.tokenize(prompt))]
        if not prompt:
            raise InvalidRequest("prompt is an empty list: send a text or token ids.", param="prompt")
        if all(isinstance(item, int) for item in prompt):
            return [(None, list(prompt))]  # type: ignore[arg-type]  # a list of ids: checked just above
        listed: list[tuple[str | None, list[int]]] = []
        for item in prompt:
            if isinstance(item, int):  # pydantic gives no mix of ids and lists; a stray id is a prompt of one
                listed.append((None, [item]))
            else:
                listed.append((item, engine.tokenize(item)) if isinstance(item, str) else (None, list(item)))
        return listed

    def to_sampling_params(self, settings: Settings, defaults: SamplingParams, prompts: int) -> SamplingParams:
        """Engine parameters for every choice (``choice_params`` varies the seed); ``prompts``: how many."""
        self.check_supported(settings)
        if prompts * self.n > settings.max_waiting_requests:
            raise InvalidRequest(
                f"{prompts} prompts with n={self.n} are {prompts * self.n} answers, more than this server queues at "
                f"once (SNARK_MAX_WAITING_REQUESTS={settings.max_waiting_requests}): send fewer per request.",
                param="prompt",
            )
        stops = stop_strings(self.stop)
        structure = response_format_output(self.response_format, settings)
        refuse_stop_beside(structure, stops, "response_format")
        return resolve_sampling(
            settings,
            defaults,
            max_new_tokens=self.max_tokens if self.max_tokens is not None else min(16, settings.max_new_tokens_limit),
            param="max_tokens",
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stops,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            ignore_eos=self.ignore_eos,
            structure=structure,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
        )


def _prompts(engine: Engine, body: CompletionRequest) -> tuple[list[PromptInputs], list[Echo]]:
    """The checked prompts, and what ``echo`` would show of each. Runs in a worker thread."""
    prompts, echoes = [], []
    listed = body.token_prompts(engine)
    single = isinstance(body.prompt, str) or all(isinstance(item, int) for item in body.prompt)
    for index, (text, ids) in enumerate(listed):
        param = "prompt" if single else f"prompt[{index}]"
        prompt = engine.prompt_from_ids(ids, param=param)
        if body.cache_salt is not None:
            prompt.cache_salt = body.cache_salt
        prompts.append(prompt)
        echoes.append(Echo(text=text if text is not None else engine.detokenize(ids, param=param), ids=ids))
    return prompts, echoes


@router.post("/completions", summary="Text completion of a raw prompt (JSON, or SSE with stream=true)")
async def create_completion(
    request: Request, body: CompletionRequest, state: AppState = Depends(get_state)
) -> Response:
    engine, settings = state.engine, state.settings
    body.check_supported(settings)  # before any tokenizing
    prompts, echoes = await asyncio.to_thread(_prompts, engine, body)
    params = body.to_sampling_params(settings, engine.default_sampling, len(prompts))
    params = await until_disconnected(request, engine.prepare(params), timeout_s=settings.request_timeout_s)
    reply = CompletionReply(
        model=engine.model_name,
        logprobs=body.logprobs,
        echoes=echoes if body.echo else None,
        token_text=lambda token_id: engine.detokenize([token_id]),
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    prompt_tokens = sum(prompt.num_tokens for prompt in prompts)
    if body.scores_only:
        # Nothing is generated: one scoring pass per prompt when logprobs are asked for, none otherwise.
        answers = await until_disconnected(
            request, _scored(engine, prompts, params, body), timeout_s=settings.request_timeout_s
        )
        usage = reply.usage(prompt_tokens, 0)
        if body.stream:
            return _sse(
                reply.scored_events(answers, usage if include_usage else None, usage_field=include_usage), reply.id
            )
        return JSONResponse(reply.completion(answers, usage))
    choices_started = Choices.start(engine, prompts, params, body.n, stream=body.stream)
    choices = await until_disconnected(request, choices_started, timeout_s=settings.request_timeout_s)
    if body.stream:
        lines = completion_events(reply, choices, include_usage=include_usage, timeout_s=settings.request_timeout_s)
        return _sse(lines, reply.id, background=BackgroundTask(choices.cancel))
    await until_disconnected(request, choices.finished(), timeout_s=settings.request_timeout_s)
    answers = [Answer(c.prompt_index, c.generation, choices.first_of(c)) for c in choices.choices]
    return JSONResponse(reply.completion(answers, reply.usage(prompt_tokens, choices.completion_tokens)))


async def _scored(
    engine: Engine, prompts: Sequence[PromptInputs], params: SamplingParams, body: CompletionRequest
) -> list[Answer]:
    """``max_tokens=0``: every choice is its prompt, scored once per prompt if logprobs are asked for."""
    if body.logprobs is None:
        return [Answer(index, None, None) for index in range(len(prompts)) for _ in range(body.n)]
    choices = await Choices.start(engine, prompts, params, 1, stream=False)
    await choices.finished()
    return [Answer(c.prompt_index, None, c.generation) for c in choices.choices for _ in range(body.n)]


def _sse(lines: AsyncGenerator[str, None], reply_id: str, background: BackgroundTask | None = None) -> Response:
    return StreamingResponse(
        sse_stream(lines, f"streamed completion {reply_id}"),
        media_type="text/event-stream",
        headers=STREAM_HEADERS,
        background=background,
    )
