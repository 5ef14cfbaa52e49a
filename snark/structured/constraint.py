"""Requests -> ``StructuredOutput`` (what both engines take), and the xgrammar structural tag that
constrains tool calls.

JSON is constrained without free whitespace between tokens (vLLM's ``disable-any-whitespace``):
a model, and certainly a random one, could otherwise spend its whole budget on spaces and newlines.
Objects come out as ``{"a": 1, "b": [2, 3]}`` (", " and ": ", as ``json.dumps`` writes them).

Tool calls follow Qwen2.5's Hermes format, which the tools-aware chat template teaches the model:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``auto`` lets the model write text and start calls when it likes (each call, once begun, is
constrained to a known name and its parameters schema); ``required`` and a named function make the
whole answer one or more calls (one with ``parallel_tool_calls: false``) and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from snark.errors import InvalidRequest
from snark.values import StructuredOutput, ToolSpec

TOOL_CALL_BEGIN = "<tool_call>"
_CALL_HEAD = '<tool_call>\n{{"name": {name}, "arguments": '
_CALL_END = "}\n</tool_call>"
ANY_OBJECT = {"type": "object"}  # a tool without a parameters schema takes any JSON object

# xgrammar 0.2.8 turns a string's minLength/maxLength into characters from [^"\\\r\n], repeated: a raw
# tab or other control character, which JSON forbids in strings (json.loads and pydantic refuse it),
# gets through, and every step inside such a string costs ~0.6 ms of mask (152k tokens checked one by
# one). The same bound written as a pattern over JSON's own string characters is enforced by xgrammar's
# regex path: valid JSON, and ~0.05 ms a step. (Quotes, backslashes and control characters stay out of
# length-bounded strings, as xgrammar's own class keeps the first two out.)
_BOUNDED_STRING = '^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
# Where a schema holds schemas: one (items, not, ...), a list of them (anyOf, prefixItems), or a map of
# names to them (properties, $defs). Everything else on a schema node is data (enum, default, title).
_ONE_SCHEMA = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def json_schema_output(schema: dict) -> StructuredOutput:
    # Key order is kept: it is the order the model writes the properties in.
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


def json_object_output() -> StructuredOutput:
    return StructuredOutput("json_object")


def tool_call_output(tools: Sequence[ToolSpec], *, required: bool, parallel: bool) -> StructuredOutput:
    """Calls to ``tools``; ``required``: the answer is calls only (at least one)."""
    spec = {
        "tools": [{"name": tool.name, "parameters": tool.parameters or ANY_OBJECT} for tool in tools],
        "required": required,
        "parallel": parallel,
    }
    return StructuredOutput("tool_calls", json.dumps(spec, ensure_ascii=False, separators=(",", ":")))


def grammar_of(structure: StructuredOutput) -> tuple[str, str]:
    """What both engines compile for ``structure``: ("grammar", xgrammar EBNF) for JSON, or
    ("structural_tag", its JSON) for tool calls. Raises ``InvalidRequest`` for a schema xgrammar
    cannot turn into a grammar."""
    try:
        if structure.kind == "json_schema":
            return "grammar", json_grammar(structure.spec)
        if structure.kind == "json_object":  # an object, as OpenAI's json_object means
            return "grammar", json_grammar(ANY_OBJECT)
        if structure.kind == "tool_calls":
            return "structural_tag", tool_calls_structural_tag(structure.spec)
    except RuntimeError as exc:
        raise schema_error(exc) from None
    raise ValueError(f"unknown structured output kind {structure.kind!r}")


def json_grammar(schema: str | dict) -> str:
    """The grammar (xgrammar's EBNF) of JSON that follows ``schema``, written without free whitespace.
    Both engines compile this text, so both constrain a request to the same grammar."""
    import xgrammar  # the grammar library both engines use; only needed once a request asks for JSON

    parsed = json.loads(schema) if isinstance(schema, str) else schema
    return str(xgrammar.Grammar.from_json_schema(json.dumps(_lengths_as_patterns(parsed)), any_whitespace=False))


def _lengths_as_patterns(schema):
    """``schema`` with every string's minLength/maxLength written as a pattern (see _BOUNDED_STRING)."""
    if not isinstance(schema, dict):
        return schema  # true / false
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if key in out:
            out[key] = _lengths_as_patterns(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_lengths_as_patterns(item) for item in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _lengths_as_patterns(item) for name, item in out[key].items()}
    low, high = out.get("minLength"), out.get("maxLength")
    if (type(low) is int or type(high) is int) and "pattern" not in out and "format" not in out:
        out.pop("minLength", None), out.pop("maxLength", None)
        out["pattern"] = _BOUNDED_STRING.format(
            low=low if type(low) is int else 0, high=high if type(high) is int else ""
        )
    return out


def tool_calls_structural_tag(spec: str) -> str:
    """A "tool_calls" ``StructuredOutput.spec`` -> the xgrammar structural tag (JSON text) that both
    engines compile: Snark's with xgrammar, vLLM through its structured outputs."""
    parsed = json.loads(spec)
    tags = []
    for tool in parsed["tools"]:
        tags.append(
            {
                "type": "tag",
                "begin": _CALL_HEAD.format(name=json.dumps(tool["name"], ensure_ascii=False)),
                "content": {"type": "grammar", "grammar": json_grammar(tool["parameters"])},
                "end": _CALL_END,
            }
        )
    if parsed["required"]:
        # Calls only, one per line; then the end of the turn.
        format_ = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
    else:
        # Free text; "<tool_call>" starts a call that must be valid.
        format_ = {"type": "triggered_tags", "triggers": [TOOL_CALL_BEGIN], "tags": tags}
    format_["stop_after_first"] = not parsed["parallel"]
    return json.dumps({"type": "structural_tag", "format": format_}, ensure_ascii=False)


def schema_error(exc: BaseException) -> InvalidRequest:
    """xgrammar's refusal of a schema (its last line names the part it cannot take) as a 400."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1].split("] ", 1)[-1] if lines else type(exc).__name__
    return InvalidRequest(f"The output schema cannot be turned into a grammar: {reason}", code="invalid_schema")
