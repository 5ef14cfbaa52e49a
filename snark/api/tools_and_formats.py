"""``response_format`` and ``tools`` of a chat request: their request models, and what they become
for the engine (a ``StructuredOutput``) and the prompt (``ToolSpec``s).

    response_format {"type": "json_schema", ...} ──► StructuredOutput("json_schema")
    response_format {"type": "json_object"}      ──► StructuredOutput("json_object")
    tools + tool_choice auto | required | named  ──► ToolSpecs for the prompt + StructuredOutput("tool_calls")
    tool_choice "none"                           ──► no tools in the prompt, free text

Every schema is checked (allowed keywords, size, depth) before anything is compiled. Schemas are
always enforced, ``strict`` or not: a constraint that holds only sometimes is no constraint.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic.json_schema import JsonDict

from snark.api.lenient import Lenient
from snark.config import Settings
from snark.errors import InvalidRequest
from snark.structured.constraint import json_object_output, json_schema_output, tool_call_output
from snark.structured.schema import LengthBudget, check_schema
from snark.values import StructuredOutput, ToolSpec

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class JsonSchemaFormat(Lenient):
    name: str = Field("response", description="A name for the schema (OpenAI requires one; Snark only reports it).")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(
        None, alias="schema", description="The JSON Schema the answer follows."
    )
    strict: bool | None = Field(None, description="Accepted: Snark always enforces the schema.")


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (default), json_object (any JSON object) or json_schema (this schema)."
    )
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema for the arguments object.")
    strict: bool | None = Field(None, description="Accepted: Snark always enforces the parameters schema.")


class ToolDefinition(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = str | dict  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
_TOOL_CHOICES = ("none", "auto", "required")
# What /openapi.json says tool_choice takes (the field is read leniently, with a message that says how).
TOOL_CHOICE_SCHEMA: JsonDict = {
    "anyOf": [
        {"enum": list(_TOOL_CHOICES)},
        {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            },
            "required": ["function"],
        },
        {"type": "null"},
    ]
}
_CHOICE_HELP = 'tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": "..."}}'


def _tool_choice(value: ToolChoice | None, has_tools: bool) -> str | NamedToolChoice:
    if value is None:
        return "auto" if has_tools else "none"
    if isinstance(value, str):
        if value not in _TOOL_CHOICES:
            raise InvalidRequest(f"{_CHOICE_HELP}; got {value!r}.", param="tool_choice")
        return value
    try:
        return NamedToolChoice.model_validate(value)
    except ValidationError:
        raise InvalidRequest(f"{_CHOICE_HELP}; got {json.dumps(value)[:200]}.", param="tool_choice") from None


def response_format_output(response_format: ResponseFormat | None, settings: Settings) -> StructuredOutput | None:
    """What ``response_format`` constrains the answer to; None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_output()
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidRequest(
            'response_format json_schema needs its schema: {"type": "json_schema", "json_schema": '
            '{"name": "...", "schema": {...}}}.',
            param="response_format.json_schema.schema",
        )
    schema = check_schema(
        response_format.json_schema.schema_,
        param="response_format.json_schema.schema",
        max_bytes=settings.max_schema_bytes,
        max_depth=settings.max_schema_depth,
    )
    return json_schema_output(schema)


def form_schema_output(text: str, settings: Settings) -> StructuredOutput:
    """The form endpoints' ``json_schema`` field (a JSON Schema as text)."""
    if len(text.encode()) > settings.max_schema_bytes:
        raise InvalidRequest(
            f"json_schema is {len(text.encode())} bytes, over this server's limit of {settings.max_schema_bytes} "
            "(SNARK_MAX_SCHEMA_BYTES): send a smaller schema.",
            param="json_schema",
            code="schema_too_large",
        )
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidRequest(
            f"json_schema is not valid JSON ({reason}): send a JSON Schema object.", param="json_schema"
        ) from None
    schema = check_schema(
        parsed, param="json_schema", max_bytes=settings.max_schema_bytes, max_depth=settings.max_schema_depth
    )
    return json_schema_output(schema)


class ToolUse:
    """A request's tools and tool_choice, checked: what the prompt shows and what the answer may be."""

    def __init__(
        self,
        tools: list[ToolDefinition] | None,
        tool_choice: ToolChoice | None,
        parallel_tool_calls: bool | None,
        settings: Settings,
    ) -> None:
        tools = tools or []
        self.choice = _tool_choice(tool_choice, bool(tools))
        if self.choice != "none" and not tools:
            raise InvalidRequest(
                "tool_choice needs tools: send the functions the model may call in tools.", param="tool_choice"
            )
        self.specs = _tool_specs(tools, settings)
        self.parallel = True if parallel_tool_calls is None else parallel_tool_calls
        if isinstance(self.choice, NamedToolChoice):
            named = [spec for spec in self.specs if spec.name == self.choice.function.name]
            if not named:
                known = ", ".join(spec.name for spec in self.specs)
                raise InvalidRequest(
                    f"tool_choice names {self.choice.function.name!r}, which is not in tools ({known}).",
                    param="tool_choice.function.name",
                )
            self.callable = named
        else:
            self.callable = self.specs if self.choice != "none" else []

    @property
    def active(self) -> bool:
        """The model may call tools: they are in the prompt and its answer is parsed for calls."""
        return bool(self.callable)

    @property
    def prompt_tools(self) -> list[ToolSpec]:
        # "none": the model is not shown the tools, so it answers in text (history may still hold calls).
        return self.specs if self.active else []

    def output(self) -> StructuredOutput | None:
        if not self.active:
            return None
        required = self.choice != "auto"  # "required" or a named function: the answer is calls only
        return tool_call_output(self.callable, required=required, parallel=self.parallel)


def _tool_specs(tools: list[ToolDefinition], settings: Settings) -> list[ToolSpec]:
    specs: list[ToolSpec] = []
    total, lengths = 0, LengthBudget()  # all parameters schemas go into one grammar: their limits add up
    for i, tool in enumerate(tools):
        function, where = tool.function, f"tools[{i}].function"
        if not _TOOL_NAME.match(function.name):
            raise InvalidRequest(
                f"{where}.name {function.name!r} is not a valid function name: "
                "use 1 to 64 letters, digits, '_' or '-'.",
                param=f"{where}.name",
            )
        if any(spec.name == function.name for spec in specs):
            raise InvalidRequest(
                f"{where}.name {function.name!r} is given twice: tool names must be unique.", param=f"{where}.name"
            )
        parameters = None
        if function.parameters is not None:
            parameters = check_schema(
                function.parameters,
                param=f"{where}.parameters",
                max_bytes=settings.max_schema_bytes,
                max_depth=settings.max_schema_depth,
                budget=lengths,
            )
            if parameters.get("type", "object") != "object":
                raise InvalidRequest(
                    f"{where}.parameters must describe an object (the call's arguments): use "
                    '{"type": "object", "properties": {...}}.',
                    param=f"{where}.parameters",
                )
            total += len(json.dumps(parameters, separators=(",", ":")).encode())
            if total > settings.max_schema_bytes:
                raise InvalidRequest(
                    f"The tools' parameters schemas are {total} bytes together (up to {where}), over this server's "
                    f"limit of {settings.max_schema_bytes} (SNARK_MAX_SCHEMA_BYTES): send fewer or smaller tools.",
                    param=f"{where}.parameters",
                    code="schema_too_large",
                )
        specs.append(ToolSpec(name=function.name, description=function.description, parameters=parameters))
    return specs
