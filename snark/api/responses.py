"""``POST /v1/responses``: OpenAI's Responses API, on chat's pipeline (turns -> prompt -> engine ->
text and tool calls).

The request model converts itself: ``chat_input`` (``input`` and ``instructions`` as chat messages,
in ``response_input``), ``tool_use`` (function ``tools`` and ``tool_choice``, checked by chat's
``ToolUse``), ``to_sampling_params`` (``max_output_tokens``, ``text.format``, the sampling fields).
The answer is built in ``response_output``.

Snark is stateless: it stores no response (``store`` is answered as false, as vLLM does without its
store), so what needs a stored one (``previous_response_id``, ``conversation``, ``background``) is
a 400, and so is every other field Snark cannot honour, named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError
from pydantic.json_schema import JsonDict
from starlette.background import BackgroundTask

from snark.api.cancellation import until_disconnected
from snark.api.image_resolution import ImageResolution
from snark.api.lenient import Lenient
from snark.api.messages import VideoOptions
from snark.api.response_input import ChatInput, chat_input
from snark.api.response_output import ResponseReply, response_stream
from snark.api.sampling import refuse_stop_beside, resolve_sampling, stop_strings
from snark.api.state import AppState, get_state
from snark.api.streaming import STREAM_HEADERS
from snark.api.tools_and_formats import FunctionDefinition, NamedToolChoice, ToolDefinition, ToolUse
from snark.config import Settings
from snark.errors import InvalidRequest
from snark.media import load_image
from snark.structured.constraint import json_object_output, json_schema_output
from snark.structured.schema import check_schema
from snark.values import SamplingParams, StructuredOutput

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


def _asks_for_reasoning(value: dict | None) -> bool:
    return bool(value) and any(v not in (None, "none") for v in value.values())  # type: ignore[union-attr]


# Fields Snark cannot honour: asking for them is a 400 naming the field. Each test gets the field's value.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "previous_response_id": (
        lambda v: v is not None,
        "previous_response_id is not supported: Snark stores no responses; send the whole conversation in input "
        "(earlier output items included).",
    ),
    "conversation": (
        lambda v: v is not None,
        "conversation is not supported: Snark stores no conversations; send the whole conversation in input.",
    ),
    "background": (
        bool,
        "background mode is not supported: Snark stores no responses to poll; wait for the answer or stream it.",
    ),
    "prompt": (lambda v: v is not None, "Stored prompts are not supported: send instructions and input instead."),
    "reasoning": (_asks_for_reasoning, "reasoning is not supported: Qwen2.5-VL is not a reasoning model."),
    "truncation": (
        lambda v: v not in (None, "disabled"),
        "truncation 'auto' is not supported: Snark never drops input; send a shorter input, or 'disabled'.",
    ),
    "max_tool_calls": (
        lambda v: v is not None,
        "max_tool_calls is not supported: send parallel_tool_calls: false for at most one call.",
    ),
    "top_logprobs": (lambda v: bool(v), "top_logprobs is not supported on /v1/responses: leave it unset."),
    "context_management": (lambda v: v is not None, "context_management is not supported: Snark never compacts input."),
}
# ``include`` values that ask for nothing Snark would leave out (it writes no reasoning to include).
_INCLUDABLE = ("reasoning.encrypted_content",)
_NULL: JsonDict = {"type": "null"}
_ONLY_NULL: JsonDict = {"anyOf": [_NULL]}
_METADATA_LIMITS = (16, 64, 512)  # OpenAI's: pairs, key characters, value characters


class FunctionTool(Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema for the arguments object.")
    strict: bool | None = Field(None, description="Accepted: Snark always enforces the parameters schema.")


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (default), json_object (any JSON object) or json_schema (this schema)."
    )
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="The JSON Schema of the answer.")
    strict: bool | None = Field(None, description="Accepted: Snark always enforces the schema.")


class TextConfig(Lenient):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility; Snark serves one model.")
    input: str | list[Any] = Field(description="A string, or a list of messages, function_call and outputs.")
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default: the model's.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no top-k cut (vLLM extension).")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Reproducible sampling (Snark extension).")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings (vLLM extension).")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="HF-style (vLLM extension).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="Run to max_output_tokens (vLLM extension, for benchmarks).")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="vLLM extension, as in chat.")
    mm_processor_kwargs: VideoOptions | None = Field(None, description="How every video is sampled (vLLM extension).")
    stream: bool = False
    store: bool | None = Field(None, description="Accepted; Snark stores nothing and answers store: false.")
    text: TextConfig | None = Field(None, description="format: text, json_object or json_schema.")
    tools: list[Any] | None = Field(None, description="Function tools: {type: function, name, parameters}.")
    tool_choice: str | dict | None = Field(
        None,
        description="none | auto | required | {type: function, name}.",
        json_schema_extra={
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "properties": {"type": {"const": "function"}, "name": {"type": "string", "minLength": 1}},
                    "required": ["type", "name"],
                },
                _NULL,
            ]
        },
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer.")
    metadata: dict[str, str] | None = Field(None, description="Echoed in the response.")
    user: str | None = Field(None, description="Accepted and echoed; not used.")
    # Refused when they ask for something (see _REFUSED); the schema shows the values that pass.
    previous_response_id: str | None = Field(None, json_schema_extra=_ONLY_NULL)
    conversation: str | dict | None = Field(None, json_schema_extra=_ONLY_NULL)
    background: bool | None = Field(None, json_schema_extra={"anyOf": [{"const": False}, _NULL]})
    prompt: dict | None = Field(None, json_schema_extra=_ONLY_NULL)
    reasoning: dict | None = Field(
        None,
        json_schema_extra={
            "anyOf": [{"type": "object", "additionalProperties": {"anyOf": [{"const": "none"}, _NULL]}}, _NULL]
        },
    )
    truncation: str | None = Field(None, json_schema_extra={"anyOf": [{"const": "disabled"}, _NULL]})
    max_tool_calls: int | None = Field(None, json_schema_extra=_ONLY_NULL)
    top_logprobs: int | None = Field(None, json_schema_extra={"anyOf": [{"const": 0}, _NULL]})
    context_management: list | dict | None = Field(None, json_schema_extra=_ONLY_NULL)
    include: list[str] | None = Field(
        None, json_schema_extra={"anyOf": [{"type": "array", "items": {"enum": list(_INCLUDABLE)}}, _NULL]}
    )

    def check_supported(self) -> None:
        for name, (asks_for_it, message) in _REFUSED.items():
            if asks_for_it(getattr(self, name)):
                raise InvalidRequest(message, param=name, code="unsupported_parameter")
        for i, value in enumerate(self.include or []):
            if value not in _INCLUDABLE:
                raise InvalidRequest(
                    f"include {value!r} is not supported by Snark: leave it out of include.",
                    param=f"include[{i}]",
                    code="unsupported_parameter",
                )
        if self.text is not None and self.text.verbosity is not None:
            raise InvalidRequest(
                "text.verbosity is not supported: bound the answer with max_output_tokens.",
                param="text.verbosity",
                code="unsupported_parameter",
            )
        pairs, key_chars, value_chars = _METADATA_LIMITS
        metadata = self.metadata or {}
        if len(metadata) > pairs or any(len(k) > key_chars or len(v) > value_chars for k, v in metadata.items()):
            raise InvalidRequest(
                f"metadata takes at most {pairs} pairs, keys of at most {key_chars} characters and values of at "
                f"most {value_chars}.",
                param="metadata",
            )

    def chat_input(self) -> ChatInput:
        return chat_input(self.instructions, self.input)

    def tool_use(self, settings: Settings) -> ToolUse:
        """The request's function tools, checked by chat's rules, errors naming this request's fields."""
        definitions = [_function_tool(raw, i) for i, raw in enumerate(self.tools or [])]
        try:
            return ToolUse(definitions, _chat_tool_choice(self.tool_choice), self.parallel_tool_calls, settings)
        except InvalidRequest as exc:  # chat's names: tools[0].function.name -> tools[0].name
            exc.message = exc.message.replace(".function.", ".")
            exc.param = exc.param and exc.param.replace(".function.", ".")
            raise

    def to_sampling_params(self, settings: Settings, defaults: SamplingParams, tools: ToolUse) -> SamplingParams:
        """Engine parameters; where the request is silent, ``defaults`` (the model's generation config)."""
        self.check_supported()
        stops = stop_strings(self.stop)
        structure = self._text_output(settings)
        if structure is not None and tools.active:
            raise InvalidRequest(
                "text.format and tools cannot constrain one answer together: send tool_choice 'none' to get the "
                "format, or leave text.format out to let the model call tools.",
                param="text.format",
                code="unsupported_parameter",
            )
        structure = structure or tools.output()
        refuse_stop_beside(structure, stops, "text.format or tools")
        return resolve_sampling(
            settings,
            defaults,
            max_new_tokens=self.max_output_tokens,
            param="max_output_tokens",
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
        )

    def _text_output(self, settings: Settings) -> StructuredOutput | None:
        format_ = self.text.format if self.text is not None else None
        if format_ is None or format_.type == "text":
            return None
        if format_.type == "json_object":
            return json_object_output()
        if format_.schema_ is None:
            raise InvalidRequest(
                'text.format json_schema needs its schema: {"type": "json_schema", "name": "...", "schema": {...}}.',
                param="text.format.schema",
            )
        schema = check_schema(
            format_.schema_,
            param="text.format.schema",
            max_bytes=settings.max_schema_bytes,
            max_depth=settings.max_schema_depth,
        )
        return json_schema_output(schema)

    def echo(self, params: SamplingParams, tools: ToolUse) -> dict[str, Any]:
        """The request's settings as the response object repeats them."""
        format_ = self.text.format if self.text is not None and self.text.format is not None else None
        text_format: dict[str, Any] = {"type": "text"}
        if format_ is not None:
            text_format = format_.model_dump(by_alias=True, exclude_none=True)
            if format_.type == "json_schema":
                text_format = {"name": "response", **text_format, "strict": True}
        choice = tools.choice
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": None,
            "metadata": self.metadata or {},
            "parallel_tool_calls": tools.parallel,
            "previous_response_id": None,
            "reasoning": None,
            "service_tier": "default",
            "store": False,
            "temperature": params.temperature,
            "text": {"format": text_format},
            "tool_choice": {"type": "function", "name": choice.function.name}
            if isinstance(choice, NamedToolChoice)
            else choice,
            "tools": [
                {
                    "type": "function",
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": spec.parameters,
                    "strict": True,
                }
                for spec in tools.specs
            ],
            "top_p": params.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


def _function_tool(raw: Any, i: int) -> ToolDefinition:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind != "function":
        raise InvalidRequest(
            f"tools[{i}].type {kind!r} is not supported: Snark calls functions only "
            '({"type": "function", "name": ..., "parameters": {...}}).',
            param=f"tools[{i}].type",
            code="unsupported_parameter",
        )
    try:
        tool = FunctionTool.model_validate(raw)
    except ValidationError as exc:
        field = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise InvalidRequest(f"tools[{i}].{field}: {exc.errors()[0]['msg']}.", param=f"tools[{i}].{field}") from None
    return ToolDefinition(
        function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
        )
    )


_CHOICE_HELP = 'tool_choice is "none", "auto", "required" or {"type": "function", "name": "..."}'


def _chat_tool_choice(value: str | dict | None) -> str | dict | None:
    """``tool_choice`` in chat's form: {"type": "function", "name": x} -> {... "function": {"name": x}}."""
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise InvalidRequest(
        f"{_CHOICE_HELP} (Snark calls functions only); got {json.dumps(value)[:200]}.",
        param="tool_choice",
        code="unsupported_parameter",
    )


@router.post("/responses", summary="Create a response (JSON, or SSE events with stream=true)", response_class=Response)
async def create_response(request: Request, body: ResponsesRequest, state: AppState = Depends(get_state)) -> Response:
    engine, settings = state.engine, state.settings
    tools = body.tool_use(settings)
    params = body.to_sampling_params(settings, engine.default_sampling, tools)
    turns = await body.chat_input().to_turns(
        partial(load_image, limits=state.image_limits, decoded=state.decoded_images),
        max_images=settings.max_images_per_request,
        videos=state.videos,
        video_options=body.mm_processor_kwargs,
        image_resolution=ImageResolution.from_settings(settings),
    )
    prompt = await engine.build_prompt(
        turns, min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels, tools=tools.prompt_tools
    )
    if body.cache_salt is not None:
        prompt = dataclasses.replace(prompt, cache_salt=body.cache_salt)
    # The output grammar, compiled off the event loop (cached by schema); a client that leaves stops waiting.
    params = await until_disconnected(request, engine.prepare(params), timeout_s=settings.request_timeout_s)
    reply = ResponseReply(model=engine.model_name, prompt_tokens=prompt.num_tokens, echo=body.echo(params, tools))
    tool_names = {spec.name for spec in tools.callable} if tools.active else None
    if body.stream:
        generation = engine.submit(prompt, params)  # a full queue is a 503 now, before the stream starts
        events = response_stream(
            reply, generation, engine.follow(generation), timeout_s=settings.request_timeout_s, tool_names=tool_names
        )
        # The stream's own finally cancels the row; this covers a client gone before the stream's first step.
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(engine.cancel, generation),
        )
    done = await until_disconnected(
        request, engine.run_to_completion(prompt, params), timeout_s=settings.request_timeout_s
    )
    return JSONResponse(reply.whole(done, tool_names=tool_names))
