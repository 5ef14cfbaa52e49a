"""The plain values that travel through Snark: chat turns, tool specs and calls, what an answer must
follow, sampling parameters and why an answer ended.

The API builds them, ``snark.structured`` reads and writes them, and both engines take them, so they
live here, above all of those, and import neither torch nor PIL: parsing a tool call or checking a
schema never loads a deep-learning library. What only the engine needs (prompt tensors, the request's
state and its thread bridge) stays in ``snark.engine.request``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a turn carries them, this module never touches their pixels
    from PIL import Image

    from snark.video.clip import Video


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-turn token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"


GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy decoding


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must follow, token by token; each engine compiles it its own way.

    ``kind`` is "json_schema" (``spec``: the schema as JSON text), "json_object" (any JSON object;
    ``spec`` empty) or "tool_calls" (``spec``: the callable tools, whether a call is required and
    whether several may come, as JSON text; ``snark.structured.constraint`` turns it into the
    structural tag both engines compile). ``compiled`` is what ``Engine.prepare`` made of it for its
    engine (Snark's: an xgrammar compiled grammar; vLLM's: the arguments of its structured outputs).
    """

    kind: str
    spec: str = ""
    compiled: object | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability at its position, and the most likely tokens there (``top``, most
    likely first, as ``(token_id, token, logprob)``). ``token`` is the token's own text; ``token_bytes``
    its exact bytes (a token may hold part of a UTF-8 character)."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI-style, over output tokens
    presence_penalty: float = 0.0
    # Run to max_new_tokens even past end-of-turn (vLLM's flag): benchmarks need fixed output lengths.
    # A constrained row still ends where its grammar ends.
    ignore_eos: bool = False
    structure: StructuredOutput | None = None  # constrained decoding (JSON schema, tool calls)
    # Log-probabilities: None is off; k >= 0 reports each generated token's logprob and its k most
    # likely alternatives (OpenAI's top_logprobs). ``prompt_logprobs`` does the same for the prompt's
    # tokens (the first has none), for /v1/completions' ``echo``.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @classmethod
    def model_defaults(cls, generation_config) -> SamplingParams:
        """The model's own recommended sampling (its generation_config.json), used where a request is
        silent, as vLLM does. Qwen2.5-VL ships temperature 0.1 / top_k 1 (greedy in effect) and
        repetition penalty 1.05."""
        g = generation_config
        do_sample = bool(getattr(g, "do_sample", False))
        return cls(
            temperature=float(g.temperature or 1.0) if do_sample else 0.0,
            top_p=float(g.top_p or 1.0) if do_sample else 1.0,
            top_k=int(g.top_k or 0) if do_sample else 0,
            repetition_penalty=float(getattr(g, "repetition_penalty", None) or 1.0),
        )

    @property
    def is_greedy(self) -> bool:
        # A temperature too small to divide by safely, or top_k=1 (Qwen2.5-VL's own default), leaves one
        # candidate: take the argmax instead of sorting and sampling 152k logits at every step (as vLLM).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class ToolCall:
    """One function call: what the model asked for, or an earlier call in the history."""

    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call (OpenAI's ``tools[].function``)."""

    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema for the arguments object; None: any object


@dataclass(frozen=True)
class ImagePart:
    """An image with the pixel bounds it is resized within before the vision tower (a request's
    ``detail`` or ``min_pixels``/``max_pixels``, already held within the server's caps). A bare image in
    a turn is resized within the bounds its prompt is built with."""

    image: Image.Image
    min_pixels: int
    max_pixels: int


@dataclass
class ChatTurn:
    """One chat message: a role and its parts, text, decoded RGB images (bare, or with bounds of their
    own) or sampled videos, in order. An assistant turn may carry the tool calls it made; a "tool" turn
    is one call's result (its text part)."""

    role: str  # "system" | "user" | "assistant" | "tool"
    parts: list[str | Image.Image | ImagePart | Video]
    tool_calls: list[ToolCall] = field(default_factory=list)
