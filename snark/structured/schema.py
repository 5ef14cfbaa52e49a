"""Check a client's JSON Schema before it is compiled into a grammar (xgrammar 0.2.8).

Grammar engines skip keywords they do not implement, so output that breaks the schema would pass as
"structured". Every keyword here is on an allowlist that was checked by generating outputs with random
allowed tokens through xgrammar's matcher and validating them with ``jsonschema``
(``tests/unit/test_schema_check.py`` keeps that honest). Anything else is a 400 naming the keyword.

What xgrammar 0.2.8 does that shapes the rules (seen by experiment, ``cpp/json_schema_converter.cc``):
- Only one of ``$ref`` > ``const`` > ``enum`` > ``anyOf`` > ``oneOf`` > ``allOf`` > ``type`` is used per
  schema node, in that order; keywords beside the winner are dropped. So those keywords may only sit
  beside annotations (``enum``/``const`` also beside a ``type`` their values match).
- Type keywords (maxLength, minimum, ...) are dropped unless the node has ``type`` (or ``properties``/
  ``items``, from which xgrammar infers object/array). ``format`` wins over ``pattern`` wins over
  min/maxLength. ``oneOf`` is generated as ``anyOf`` when branches overlap; ``allOf`` with more than
  one schema becomes "any value"; ``multipleOf`` is kept only for integers <= 1024 with no bound or
  with both bounds less than 10000 apart. not, if/then/else, dependent*, uniqueItems, contains: dropped.
- Known gap we accept: ``format: date``/``date-time`` check the shape (day 01-31 for any month), not
  the calendar. (Strings under minLength/maxLength would let raw control characters through, which JSON
  forbids; ``snark.structured.constraint.json_grammar`` narrows that character class.)

Compile times, Qwen2 tokenizer (151,936 tokens), 2-core machine, wall (cpu) seconds:
- maxLength 32: 0.47 (0.93); 64: 0.99 (1.96); 128: 2.07 (4.1); >= 200: 3.1 (6.2). minLength: ~60% of that.
  Each string length keyword costs this again, so lengths share one budget: ``MAX_STRING_LENGTH_UNITS``.
- pattern ``[\\s\\S]{0,n}``: n=64 0.61, n=128 1.2, n=5000 9.5; ``a{3000}`` 0.46. Quantifier bounds count
  towards the same budget.
- cheap (< 0.02 s): minItems/maxItems 10**9, min/maxProperties 1000, integer range +-1e18, number range
  1e-300..1e300, 16 nested anyOf, 16 nested arrays, recursive $ref; enum of 10,000 strings 0.4 s.
- Inlined copies of a subschema are not shared: objects nesting two copies of the level below take
  0.03 s at 8 levels and 1.6 s at 12 (exponential); ``max_bytes`` bounds this, $ref copies are shared.
"""

from __future__ import annotations

import json
import math
import re
from typing import NoReturn

from snark.errors import InvalidRequest

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "examples",
        "default",
        "$comment",
        "$schema",
        "$id",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
    }
)
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems"})
OBJECT_KEYWORDS = frozenset(
    {
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "minProperties",
        "maxProperties",
    }
)
# Keywords that win over everything beside them (see the module docstring), in xgrammar's order.
LEADING = ("$ref", "const", "enum", "anyOf", "allOf")
ALLOWED = (
    STRING_KEYWORDS
    | NUMBER_KEYWORDS
    | ARRAY_KEYWORDS
    | OBJECT_KEYWORDS
    | {
        "type",
        *LEADING,
        "$defs",
        "definitions",
    }
)
TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
# Formats whose regex xgrammar 0.2.8 builds in (others are silently ignored).
FORMATS = frozenset(
    {
        "date",
        "time",
        "date-time",
        "duration",
        "email",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
    }
)  # not ipv4/ipv6: xgrammar lets through leading zeros ("4.08.43.19"), which the format forbids
HINTS = {
    "oneOf": "use anyOf: outputs could match several branches, which oneOf forbids",
    "not": "describe the allowed values directly",
    "if": "use anyOf over the cases",
    "then": "use anyOf over the cases",
    "else": "use anyOf over the cases",
    "uniqueItems": "remove it and de-duplicate after parsing",
    "unevaluatedProperties": "use additionalProperties",
    "propertyNames": "list the names in properties with additionalProperties: false",
}
# Measured above: these keep any accepted schema near 2 s of compile time.
MAX_STRING_LENGTH_UNITS = 128  # sum of minLength/maxLength and pattern quantifier bounds
MAX_COUNT = 1000  # minItems / minProperties: the output has to fit in max_tokens anyway
MAX_INTEGER_BOUND = 10**18  # xgrammar aborts near the int64 limits
MAX_MULTIPLE_OF, MAX_MULTIPLE_OF_RANGE = 1024, 10_000

_UNSUPPORTED_REGEX = [
    (re.compile(r"\(\?<?[=!]"), "lookarounds ((?=, (?!, (?<=, (?<!)"),
    (re.compile(r"\(\?P?<\w"), "named groups"),
    (re.compile(r"\\[1-9]|\\k<"), "backreferences"),
    (re.compile(r"\\[pP]\{"), "Unicode property classes (\\p{...})"),
    (re.compile(r"\\[bB]"), "word boundaries (\\b, \\B)"),
]
_QUANTIFIER = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


class LengthBudget:
    """String length units spent so far: one schema's, or all of a request's tools' (they are compiled
    into one grammar, so their compile times add up)."""

    def __init__(self) -> None:
        self.units = 0


class _Checker:
    def __init__(self, root: dict, param: str, max_depth: int, budget: LengthBudget) -> None:
        self.root, self.param, self.max_depth = root, param, max_depth
        self.budget = budget

    def fail(self, where: str, message: str, code: str = "unsupported_schema") -> NoReturn:
        raise InvalidRequest(f"{message} (at {where or '/'})", param=self.param, code=code)

    def walk(self, node: object, where: str, depth: int) -> None:
        if node is True:
            return
        if not isinstance(node, dict):
            self.fail(where, "a schema must be a JSON object (or true)", "invalid_schema")
        if depth > self.max_depth:
            self.fail(
                where,
                f"the schema nests deeper than {self.max_depth} levels (SNARK_MAX_SCHEMA_DEPTH); flatten it",
                "schema_too_large",
            )
        for key in node:
            if key not in ALLOWED and key not in ANNOTATIONS:
                hint = HINTS.get(key, "remove it, or check the value after parsing")
                self.fail(f"{where}/{key}", f"the keyword {key!r} is not supported in structured output: {hint}")
        types = self.types(node, where)
        leading = [k for k in LEADING if k in node]
        if leading:
            self.check_leading(node, where, depth, leading[0], leading, types)
        for group, wanted in (
            (STRING_KEYWORDS, {"string"}),
            (NUMBER_KEYWORDS, {"integer", "number"}),
            (ARRAY_KEYWORDS, {"array"}),
            (OBJECT_KEYWORDS, {"object"}),
        ):
            present = sorted(group & node.keys())
            if present and not types & wanted:
                self.fail(where, f'{present[0]!r} needs "type": "{sorted(wanted)[0]}" beside it')
        for key in ("$defs", "definitions"):
            if key in node:
                self.subschemas(node[key], f"{where}/{key}", depth + 1, key)
        if "string" in types:
            self.check_string(node, where)
        if types & {"integer", "number"}:
            self.check_number(node, where, types)
        if "array" in types:
            self.check_array(node, where, depth)
        if "object" in types:
            self.check_object(node, where, depth)

    def types(self, node: dict, where: str) -> set[str]:
        declared = node.get("type")
        if declared is None:  # xgrammar infers only these two
            return (
                {"object"}
                if {"properties", "additionalProperties"} & node.keys()
                else {"array"}
                if {"items", "prefixItems"} & node.keys()
                else set()
            )
        listed = declared if isinstance(declared, list) else [declared]
        if not listed or any(t not in TYPES for t in listed) or len(set(listed)) != len(listed):
            self.fail(f"{where}/type", f"type must be one of {', '.join(TYPES)} or a list of them", "invalid_schema")
        return set(listed)

    def check_leading(self, node, where, depth, key, leading, types) -> None:
        others = sorted(
            k
            for k in node.keys() - ANNOTATIONS - {"$defs", "definitions", key}
            if not (k == "type" and key in ("enum", "const"))
        )
        if others:
            self.fail(
                where, f"{others[0]!r} beside {key!r} would be ignored; move it into the referenced or listed schemas"
            )
        value = node[key]
        if key == "$ref":
            self.check_ref(value, f"{where}/$ref")
        elif key in ("enum", "const"):
            values = value if key == "enum" else [value]
            if key == "enum" and (not isinstance(value, list) or not value):
                self.fail(f"{where}/enum", "enum must be a non-empty list", "invalid_schema")
            if "type" in node and not all(any(_is_type(v, t) for t in types) for v in values):
                self.fail(f"{where}/{key}", f'every {key} value must match "type"', "invalid_schema")
        else:
            if not isinstance(value, list) or not value:
                self.fail(f"{where}/{key}", f"{key} must be a non-empty list of schemas", "invalid_schema")
            if key == "allOf" and len(value) > 1:
                self.fail(f"{where}/allOf", "allOf with more than one schema is not enforced; merge them into one")
            for i, sub in enumerate(value):
                self.walk(sub, f"{where}/{key}/{i}", depth + 1)

    def check_ref(self, ref: object, where: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            self.fail(where, 'only local $ref like "#/$defs/Name" are supported; inline remote schemas')
        target: object = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                self.fail(where, f"$ref {ref!r} points to nothing in this schema", "invalid_schema")
            target = target[part]

    def check_string(self, node: dict, where: str) -> None:
        lengths = [k for k in ("minLength", "maxLength") if k in node]
        for key in lengths:
            self.count(node[key], f"{where}/{key}", cap=None)
            self.spend(node[key], f"{where}/{key}")
        if "format" in node:
            if node["format"] not in FORMATS:
                self.fail(
                    f"{where}/format",
                    f"format {node['format']!r} is not enforced; use one of {', '.join(sorted(FORMATS))} or a pattern",
                )
            if "pattern" in node or lengths:
                self.fail(where, "format cannot be combined with pattern/minLength/maxLength (they would be ignored)")
        if "pattern" in node:
            if lengths:
                self.fail(
                    where,
                    f"pattern cannot be combined with {lengths[0]} (it would be ignored); put the "
                    "length into the pattern, e.g. ^[a-z]{1,20}$",
                )
            self.check_pattern(node["pattern"], f"{where}/pattern")

    def check_pattern(self, pattern: object, where: str) -> None:
        if not isinstance(pattern, str):
            self.fail(where, "pattern must be a string", "invalid_schema")
        for regex, what in _UNSUPPORTED_REGEX:
            if regex.search(pattern):
                self.fail(where, f"pattern uses {what}, which structured output cannot enforce; rewrite it")
        self.check_nesting(pattern, where)
        for low, high in _QUANTIFIER.findall(pattern):
            self.spend(int(high or low), where)
        import xgrammar  # compile-check the regex alone: no tokenizer needed, takes well under 1 ms

        try:
            xgrammar.Grammar.from_regex(pattern)
        except Exception as error:  # xgrammar raises RuntimeError with the parser's position
            self.fail(where, f"pattern is not supported: {str(error).strip().splitlines()[-1]}")

    def check_nesting(self, pattern: str, where: str) -> None:
        # A counted quantifier on a group that holds another multiplies the grammar: (a{100}){100}.
        counted_inside: list[bool] = []
        for i, char in enumerate(pattern):
            if char == "(" and (i == 0 or pattern[i - 1] != "\\"):
                counted_inside.append(False)
            elif char == ")" and counted_inside and pattern[i - 1] != "\\":
                inner = counted_inside.pop()
                if inner and _QUANTIFIER.match(pattern, i + 1):
                    self.fail(where, "pattern nests counted repetitions like (a{2}){3}; spell it out")
                if counted_inside:
                    counted_inside[-1] |= inner
            elif char == "{" and counted_inside and _QUANTIFIER.match(pattern, i):
                counted_inside[-1] = True

    def spend(self, units: int, where: str) -> None:
        self.budget.units += min(units, 256)
        if self.budget.units > MAX_STRING_LENGTH_UNITS:
            self.fail(
                where,
                f"string length limits (minLength, maxLength, pattern counts) add up to more than "
                f"{MAX_STRING_LENGTH_UNITS} characters over the schema (all tools' schemas together); use "
                "smaller limits or drop some and check lengths after parsing",
                "schema_too_large",
            )

    def check_number(self, node: dict, where: str, types: set[str]) -> None:
        for key in sorted(NUMBER_KEYWORDS & node.keys()):
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.fail(f"{where}/{key}", f"{key} must be a finite number", "invalid_schema")
            if "integer" in types and key != "multipleOf":
                if value != int(value) or abs(value) > MAX_INTEGER_BOUND:
                    self.fail(
                        f"{where}/{key}",
                        f"{key} for an integer must be a whole number within +-{MAX_INTEGER_BOUND:.0e}",
                        "schema_too_large" if value == int(value) else "invalid_schema",
                    )
        if "multipleOf" in node:
            step = node["multipleOf"]
            lows = [node[k] for k in ("minimum", "exclusiveMinimum") if k in node]
            highs = [node[k] for k in ("maximum", "exclusiveMaximum") if k in node]
            bounded = not lows and not highs or (lows and highs and min(highs) - max(lows) <= MAX_MULTIPLE_OF_RANGE)
            if types != {"integer"} or step != int(step) or not 1 <= step <= MAX_MULTIPLE_OF or not bounded:
                self.fail(
                    f"{where}/multipleOf",
                    f'multipleOf is enforced only for "type": "integer", as a whole '
                    f"number up to {MAX_MULTIPLE_OF}, with no bounds or with minimum and maximum at most "
                    f"{MAX_MULTIPLE_OF_RANGE} apart",
                )

    def check_array(self, node: dict, where: str, depth: int) -> None:
        for key in ("minItems", "maxItems"):
            if key in node:
                self.count(node[key], f"{where}/{key}", cap=MAX_COUNT if key == "minItems" else None)
        if "items" in node and node["items"] is not False:
            self.walk(node["items"], f"{where}/items", depth + 1)
        if "prefixItems" in node:
            self.subschemas(node["prefixItems"], f"{where}/prefixItems", depth + 1, "prefixItems")

    def check_object(self, node: dict, where: str, depth: int) -> None:
        if "properties" in node:
            self.subschemas(node["properties"], f"{where}/properties", depth + 1, "properties")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            self.fail(f"{where}/required", "required must be a list of property names", "invalid_schema")
        properties = node.get("properties")
        listed = properties if isinstance(properties, dict) else {}
        for name in required:
            if name not in listed:  # xgrammar would drop the requirement and let an answer without it through
                self.fail(
                    f"{where}/required",
                    f"required names {name!r}, which is not in properties: describe it "
                    f'there (any value: "{name}": {{}})',
                )
        extra = node.get("additionalProperties", False)
        if extra is not False:
            self.walk(extra, f"{where}/additionalProperties", depth + 1)
        if "patternProperties" in node:
            self.subschemas(node["patternProperties"], f"{where}/patternProperties", depth + 1, "patternProperties")
            for name in node["patternProperties"]:
                self.check_pattern(name, f"{where}/patternProperties")
        for key in ("minProperties", "maxProperties"):
            if key in node:
                self.count(node[key], f"{where}/{key}", cap=MAX_COUNT if key == "minProperties" else None)

    def subschemas(self, value: object, where: str, depth: int, key: str) -> None:
        if key == "prefixItems":
            if not isinstance(value, list):
                self.fail(where, "prefixItems must be a list of schemas", "invalid_schema")
            items = [(str(i), sub) for i, sub in enumerate(value)]
        elif not isinstance(value, dict):
            self.fail(where, f"{key} must be an object of schemas", "invalid_schema")
        else:
            items = list(value.items())
        for name, sub in items:
            self.walk(sub, f"{where}/{name}", depth)

    def count(self, value: object, where: str, cap: int | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(where, f"{where.rsplit('/', 1)[-1]} must be a non-negative integer", "invalid_schema")
        if cap is not None and value > cap:
            self.fail(where, f"{where.rsplit('/', 1)[-1]} is capped at {cap}", "schema_too_large")


_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def _is_type(value: object, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    return isinstance(value, _PYTHON_TYPES[name]) and not (name == "number" and isinstance(value, bool))


def check_schema(
    schema: object, *, param: str, max_bytes: int, max_depth: int, budget: LengthBudget | None = None
) -> dict:
    """Return ``schema`` (``True`` becomes ``{}``) if xgrammar enforces all of it cheaply; else 400.
    ``budget``: string length units shared with other schemas of the same grammar (a request's tools)."""
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise InvalidRequest("the schema must be a JSON object", param=param, code="invalid_schema")
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > max_bytes:
        raise InvalidRequest(
            f"the schema is {size} bytes, over this server's limit of {max_bytes} (SNARK_MAX_SCHEMA_BYTES): send a "
            "smaller schema",
            param=param,
            code="schema_too_large",
        )
    _Checker(schema, param, max_depth, budget or LengthBudget()).walk(schema, "", 0)
    return schema
