"""The OpenAI-compatible request models (chat, speech), and how a request becomes engine work.

Requests convert themselves: ``ChatCompletionRequest.to_sampling_params`` (defaults in one place,
``sampling``, shared with the form routes; features Snark cannot honour refused with a 400 naming the
field) and ``to_turns`` (messages -> ``ChatTurn``s through ``messages``, images fetched through the
loader the route passes in). Requests are checked here, where they enter (``audio_output``,
``SpeechRequest.check_supported``: the speed among the rest); the code behind the route trusts them.
``response_format`` and ``tools`` are modelled in ``structured``; response bodies are built in ``replies``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image
from pydantic import Field
from pydantic.json_schema import JsonDict

from snark.api.image_resolution import ImageResolution
from snark.api.lenient import Lenient
from snark.api.logprobs import MAX_TOP_LOGPROBS
from snark.api.messages import ChatMessage, VideoOptions, messages_to_turns
from snark.api.openapi import up_to
from snark.api.sampling import refuse_stop_beside, resolve_sampling, stop_strings
from snark.api.tools_and_formats import (
    TOOL_CHOICE_SCHEMA,
    ResponseFormat,
    ToolChoice,
    ToolDefinition,
    ToolUse,
    response_format_output,
)
from snark.config import Settings
from snark.errors import InvalidRequest
from snark.speech.base import validate_speed
from snark.values import ChatTurn, SamplingParams
from snark.video.load import VideoLoader

# Options Snark cannot honour: asking for them is a 400 naming the field, never silently ignored.
# Each test gets the field's value; "off" values (function_call="none", logit_bias={}) pass.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (bool, "functions (OpenAI's older form) is not supported: send the same definitions as tools."),
    "function_call": (lambda v: v not in (None, "none"), "function_call is not supported: use tool_choice with tools."),
    "logit_bias": (bool, "logit_bias is not supported by Snark: leave it unset."),
    "prediction": (lambda v: v is not None, "Predicted outputs are not supported by Snark: leave prediction unset."),
    "web_search_options": (lambda v: v is not None, "Web search is not supported by Snark."),
    "reasoning_effort": (
        lambda v: v is not None,
        "reasoning_effort is not supported: Qwen2.5-VL is not a reasoning model.",
    ),
    "verbosity": (lambda v: v is not None, "verbosity is not supported by Snark: bound the answer with max_tokens."),
}


_NULL: JsonDict = {"type": "null"}
# What /openapi.json says each refused field takes: only the values that ask for nothing.
_REFUSED_SCHEMA: dict[str, JsonDict] = {
    "functions": {"anyOf": [{"type": "array", "maxItems": 0}, _NULL]},
    "function_call": {"anyOf": [{"const": "none"}, _NULL]},
    "logit_bias": {"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]},
    "prediction": {"anyOf": [_NULL]},
    "web_search_options": {"anyOf": [_NULL]},
    "reasoning_effort": {"anyOf": [_NULL]},
    "verbosity": {"anyOf": [_NULL]},
}

CHAT_AUDIO_FORMATS = ("wav", "pcm16")


class ChatAudio(Lenient):
    voice: str | dict | None = Field(
        None, description="OpenAI voice names speak with the default voice; or a SNARK_TTS_VOICES name."
    )
    format: str = Field(
        "wav",
        description="wav (whole file) or pcm16 (24 kHz 16-bit mono; the one streamed format).",
        json_schema_extra={"enum": list(CHAT_AUDIO_FORMATS)},
    )
    speed: float = Field(
        1.0,
        description="0.25 to 4.0 (a Snark extension); 1.0 is normal.",
        json_schema_extra={"minimum": 0.25, "maximum": 4.0},
    )

    @property
    def voice_name(self) -> str | None:
        return self.voice.get("id") if isinstance(self.voice, dict) else self.voice


class StreamOptions(Lenient):
    include_usage: bool = False


class ChatCompletionRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility; Snark serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, json_schema_extra=up_to("max_new_tokens_limit"))
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Wins over max_tokens.", json_schema_extra=up_to("max_new_tokens_limit")
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default: the model's.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no top-k cut (vLLM extension).")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
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
    ignore_eos: bool = Field(False, description="Run to max_tokens past end-of-turn (vLLM extension, for benchmarks).")
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Requests with different salts share no cached prompt prefix "
        "(vLLM extension: keeps tenants apart).",
    )
    mm_processor_kwargs: VideoOptions | None = Field(
        None,
        description="How every video of the request is sampled, and min/max_pixels of every image (vLLM extension); "
        "a part's own fields win.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema with a schema.")
    tools: list[ToolDefinition] | None = Field(None, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        None,
        description="none | auto (default with tools) | required | a named function.",
        json_schema_extra=TOOL_CHOICE_SCHEMA,
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer.")
    n: int | None = Field(
        None,
        ge=1,
        description="Choices, at most SNARK_MAX_N; each samples on its own.",
        json_schema_extra=up_to("max_n"),
    )
    logprobs: bool | None = Field(None, description="true: each answer token's log-probability (logprobs.content).")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the most likely tokens at each position too."
    )
    # Refused when they ask for something (see _REFUSED); the schema shows the values that pass.
    functions: list[dict] | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["functions"])
    function_call: str | dict | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["function_call"])
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["logit_bias"])
    modalities: list[str] | None = Field(
        None,
        description='["text"] (default) or ["text", "audio"] with audio.',
        json_schema_extra={
            "anyOf": [
                {"type": "array", "items": {"enum": ["text", "audio"]}, "contains": {"const": "text"}},
                {"type": "null"},
            ]
        },
    )
    audio: ChatAudio | None = Field(None, description="With audio in modalities: {voice, format: wav | pcm16}.")
    prediction: dict | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["prediction"])
    web_search_options: dict | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["web_search_options"])
    reasoning_effort: str | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["reasoning_effort"])
    verbosity: str | None = Field(None, json_schema_extra=_REFUSED_SCHEMA["verbosity"])

    def tool_use(self, settings: Settings) -> ToolUse:
        """The request's tools, checked: what the prompt shows and what the answer may be."""
        return ToolUse(self.tools, self.tool_choice, self.parallel_tool_calls, settings)

    def to_sampling_params(
        self, settings: Settings, defaults: SamplingParams, tools: ToolUse | None = None
    ) -> SamplingParams:
        """Engine parameters; where the request is silent, ``defaults`` (the model's generation config).
        ``tools``: this request's ``tool_use`` when the caller has it already."""
        tools = tools or self.tool_use(settings)
        for name, (asks_for_it, message) in _REFUSED.items():
            if asks_for_it(getattr(self, name)):
                raise InvalidRequest(message, param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true.", param="stream_options")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true: send both.", param="top_logprobs")
        if self.choices > settings.max_n:
            raise InvalidRequest(
                f"n={self.n} is over this server's limit of {settings.max_n} choices (SNARK_MAX_N): ask for fewer.",
                param="n",
            )
        stops = stop_strings(self.stop)

        structure = response_format_output(self.response_format, settings)
        if structure is not None and tools.active:
            raise InvalidRequest(
                "response_format and tools cannot constrain one answer together: send tool_choice 'none' "
                "to get the response_format, or leave response_format out to let the model call tools.",
                param="response_format",
                code="unsupported_parameter",
            )
        structure = structure or tools.output()
        refuse_stop_beside(structure, stops, "response_format or tools")
        param, max_new = "max_tokens", self.max_tokens
        if self.max_completion_tokens is not None:
            param, max_new = "max_completion_tokens", self.max_completion_tokens
        return resolve_sampling(
            settings,
            defaults,
            max_new_tokens=max_new,
            param=param,
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
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )

    @property
    def choices(self) -> int:
        """How many choices to answer with (``n``)."""
        return self.n or 1

    def audio_output(self, tools: ToolUse | None = None) -> ChatAudio | None:
        """The audio the request asks for (``modalities`` with "audio"), checked; None for text only."""
        modalities = set(self.modalities or ["text"])
        if not modalities <= {"text", "audio"} or "text" not in modalities:
            raise InvalidRequest(
                'modalities must be ["text"] or ["text", "audio"].', param="modalities", code="unsupported_parameter"
            )
        if "audio" not in modalities:
            if self.audio is not None:
                raise InvalidRequest('audio needs "modalities": ["text", "audio"].', param="modalities")
            return None
        if self.audio is None:
            raise InvalidRequest(
                'modalities has "audio": send "audio": {"voice": "alloy", "format": "wav"} too.', param="audio"
            )
        if self.choices > 1:
            raise InvalidRequest(
                "A spoken answer has one voice reading one choice: send n=1 with audio, or ask for text only.",
                param="n",
                code="unsupported_parameter",
            )
        if self.logprobs:
            raise InvalidRequest(
                "A spoken answer carries no log-probabilities: leave logprobs unset with audio, or ask for text only.",
                param="logprobs",
                code="unsupported_parameter",
            )
        if tools is not None and tools.active:
            raise InvalidRequest(
                'A spoken answer cannot carry tool calls: send tool_choice "none" with audio, or ask for text only.',
                param="tool_choice",
                code="unsupported_parameter",
            )
        if self.audio.format not in CHAT_AUDIO_FORMATS:
            raise InvalidRequest(
                f"audio.format {self.audio.format!r} is not supported: Snark writes wav and pcm16 (no mp3/opus/flac "
                "encoder).",
                param="audio.format",
                code="unsupported_parameter",
            )
        if self.stream and self.audio.format != "pcm16":
            raise InvalidRequest(
                'stream=true sends audio as pcm16 chunks (as OpenAI does): use "format": "pcm16", '
                "or stream=false for wav.",
                param="audio.format",
            )
        validate_speed(self.audio.speed)
        return self.audio

    async def to_turns(
        self,
        load_image: Callable[[str], Awaitable[Image.Image]],
        *,
        max_images: int,
        videos: VideoLoader | None = None,
        image_resolution: ImageResolution | None = None,
    ) -> list[ChatTurn]:
        """Messages -> chat turns, images fetched concurrently with ``load_image`` (each with the bounds
        its fields ask for, within ``image_resolution``'s caps) and videos with ``videos``. Every message
        is checked before anything is fetched, so a malformed request costs no downloads."""
        return await messages_to_turns(
            self.messages,
            load_image,
            max_images=max_images,
            videos=videos,
            video_options=self.mm_processor_kwargs,
            image_resolution=image_resolution,
        )


# --- speech ---------------------------------------------------------------------------------------

SPEECH_FORMATS = ("wav", "pcm")
MAX_SPEECH_INPUT_CHARS = 4096  # OpenAI's own cap; longer texts go in several requests


class SpeechVoice(Lenient):
    id: str


class SpeechRequest(Lenient):
    model: str | None = Field(None, description="Accepted for compatibility (tts-1, ...); Snark has one TTS.")
    input: str = Field(
        description=f"The text to speak, at most {MAX_SPEECH_INPUT_CHARS} characters.",
        json_schema_extra={"minLength": 1, "maxLength": MAX_SPEECH_INPUT_CHARS, "pattern": r"\S"},
    )
    voice: str | SpeechVoice | None = Field(
        None,
        description="A SNARK_TTS_VOICES name; OpenAI's voice names (alloy, echo, ...) speak with the default voice.",
    )
    response_format: str = Field(
        "wav",
        description="wav (default) or pcm (raw 24 kHz 16-bit mono).",
        json_schema_extra={"enum": list(SPEECH_FORMATS)},
    )
    speed: float = Field(
        1.0, description="0.25 to 4.0; 1.0 is normal.", json_schema_extra={"minimum": 0.25, "maximum": 4.0}
    )
    instructions: str | None = Field(
        None, description="Not supported: leave it unset.", json_schema_extra={"anyOf": [{"type": "null"}]}
    )
    stream_format: str | None = Field(
        None,
        description="audio (the bytes, the only stream Snark sends).",
        json_schema_extra={"anyOf": [{"type": "string", "enum": ["audio"]}, {"type": "null"}]},
    )

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, SpeechVoice) else self.voice

    def check_supported(self) -> None:
        """Raise ``InvalidRequest`` naming the field for anything Snark cannot honour."""
        if self.response_format not in SPEECH_FORMATS:
            raise InvalidRequest(
                f"response_format {self.response_format!r} is not supported: Snark writes only wav and pcm "
                "(no mp3/opus/aac/flac encoder); ask for 'wav' or 'pcm'.",
                param="response_format",
                code="unsupported_parameter",
            )
        if not self.input.strip():
            raise InvalidRequest("input is empty: send the text to speak.", param="input")
        if len(self.input) > MAX_SPEECH_INPUT_CHARS:
            raise InvalidRequest(
                f"input is {len(self.input)} characters; send at most {MAX_SPEECH_INPUT_CHARS} per request.",
                param="input",
            )
        validate_speed(self.speed)
        if self.instructions:
            raise InvalidRequest(
                "instructions (voice style prompts) are not supported by Snark's TTS.", param="instructions"
            )
        if self.stream_format not in (None, "audio"):
            raise InvalidRequest(
                "stream_format must be 'audio': Snark streams the audio bytes, not SSE.", param="stream_format"
            )
