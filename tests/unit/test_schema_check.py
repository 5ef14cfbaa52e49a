"""The JSON Schema check in front of xgrammar: what passes is enforced, the rest is a clear 400.

The enforcement tests drive xgrammar's real matcher with the real Qwen2 tokenizer, picking random
allowed tokens, and validate every finished output with ``jsonschema``: if a new xgrammar stops
enforcing an allowlisted keyword, they fail.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import xgrammar as xgr
from pydantic import BaseModel, Field

from snark.errors import InvalidRequest
from snark.structured.constraint import json_grammar
from snark.structured.schema import check_schema

LIMITS = {"max_bytes": 32 * 1024, "max_depth": 16}


def check(schema):
    return check_schema(schema, param="response_format.json_schema.schema", **LIMITS)


def refused(schema, code: str = "unsupported_schema", **limits) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check_schema(schema, param="tools[2].function.parameters", **{**LIMITS, **limits})
    assert caught.value.param == "tools[2].function.parameters"
    assert caught.value.code == code, caught.value.message
    return caught.value


RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 40, "description": "shop name"},
        "date": {"type": "string", "format": "date"},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "payment": {"type": "string", "enum": ["cash", "card", "other"]},
        "total": {"type": "number", "minimum": 0},
        "items": {
            "type": "array",
            "maxItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["name", "price"],
                "additionalProperties": False,
            },
        },
        "tip": {"type": ["number", "null"]},
    },
    "required": ["merchant", "total", "items"],
    "additionalProperties": False,
}


class Address(BaseModel):
    street: str
    city: str = Field(description="city name")


class Person(BaseModel):
    name: str
    age: int | None = None
    home: Address
    others: list[Address] = []


def strict(schema: dict) -> dict:
    """The strict form OpenAI's client sends: no extra properties, every property required."""
    if schema.get("type") == "object":
        schema["additionalProperties"] = False
        schema["required"] = list(schema.get("properties", {}))
    for value in schema.values():
        for sub in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
            if isinstance(sub, dict):
                strict(sub)
    return schema


@pytest.mark.parametrize(
    "schema",
    [
        RECEIPT,
        Person.model_json_schema(),
        strict(Person.model_json_schema()),
        {"type": "object", "properties": {"answer": {"type": "string"}}},
        {
            "$defs": {
                "N": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}}}
            },
            "$ref": "#/$defs/N",
        },
    ],
    ids=["receipt", "pydantic", "openai-strict", "simple", "recursive"],
)
def test_supported_schemas_pass(schema):
    assert check(schema) is schema


def test_true_means_any_json():
    assert check(True) == {}


@pytest.mark.parametrize(
    "keyword, schema",
    [
        ("multipleOf", {"type": "number", "multipleOf": 0.5}),
        ("multipleOf", {"type": "integer", "multipleOf": 7, "minimum": 0}),
        ("uniqueItems", {"type": "array", "uniqueItems": True}),
        ("contains", {"type": "array", "contains": {"const": 3}}),
        ("not", {"type": "integer", "not": {"const": 0}}),
        ("if", {"if": {"minimum": 0}, "then": {"maximum": 5}}),
        ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
        ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),
        ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 3}]}),
        ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
        ("maximum", {"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A", "maximum": 3}),
        ("properties", {"anyOf": [{"type": "object"}], "type": "object", "properties": {"a": {}}}),
        ("maxLength", {"maxLength": 2}),
        ("format", {"type": "string", "format": "date", "maxLength": 3}),
        ("pattern", {"type": "string", "pattern": "^a+$", "maxLength": 3}),
        ("format", {"type": "string", "format": "credit-card"}),
        ("ipv4", {"type": "string", "format": "ipv4"}),
        ("$ref", {"$ref": "https://example.com/schema.json"}),
        ("lookarounds", {"type": "string", "pattern": "^(?=a)a$"}),
        ("backreferences", {"type": "string", "pattern": "^(a)\\1$"}),
        ("\\p", {"type": "string", "pattern": "^\\p{L}+$"}),
        ("nests", {"type": "string", "pattern": "^(a{3}){4}$"}),
    ],
)
def test_unsupported_keywords_are_refused_by_name(keyword, schema):
    assert keyword in refused({"type": "object", "properties": {"field": schema}}).message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strings"},
        {"type": "object", "properties": []},
        {"enum": []},
        {"$ref": "#/$defs/Missing"},
        {"type": "string", "enum": ["a", 1]},
        {"type": "array", "minItems": -1},
        42,
    ],
)
def test_malformed_schemas_are_invalid(schema):
    refused(schema, code="invalid_schema")


def test_size_and_depth_limits():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    assert "limit of 32768 (SNARK_MAX_SCHEMA_BYTES)" in refused(big, code="schema_too_large").message
    deep = {"type": "integer"}
    for _ in range(17):
        deep = {"type": "array", "items": deep}
    assert "16 levels" in refused(deep, code="schema_too_large").message
    check_schema(deep["items"], param="p", **LIMITS)  # 16 levels is fine


@pytest.mark.parametrize(
    "keyword, schema",
    [
        ("maxLength", {"type": "string", "maxLength": 10**9}),
        ("minLength", {"type": "string", "minLength": 50_000}),
        ("minItems", {"type": "array", "minItems": 100_000}),
        ("minimum", {"type": "integer", "minimum": -(10**19)}),
        ("pattern", {"type": "string", "pattern": "^a{5000}$"}),
        (
            "maxLength",
            {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 60} for i in range(3)}},
        ),
    ],
)
def test_hostile_bounds_are_refused(keyword, schema):
    error = refused(schema, code="schema_too_large")
    assert keyword in error.message or keyword in str(error.message)


# --- enforcement: every allowlisted keyword really constrains xgrammar's output ---------------------

DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"  # shape only: xgrammar does not know the calendar
TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
STRICT_FORMATS = {
    "date": re.compile(f"^{DATE}$").match,
    "date-time": re.compile(f"^{DATE}T{TIME}$").match,
    "time": re.compile(f"^{TIME}$").match,
    "hostname": re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$").match,
    "uri": re.compile(r"^[a-zA-Z][a-zA-Z+.-]*:").match,
}
ENFORCED = {
    "type": {"type": ["integer", "null"]},
    "maxLength": {"type": "string", "maxLength": 3},
    "minLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "pattern": {"type": "string", "pattern": "^[a-c]{2,4}-[0-9]+$"},
    "minimum/maximum": {"type": "integer", "minimum": -5, "maximum": 17},
    "exclusive integer": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 17},
    "number bounds": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 2.25},
    "multipleOf": {"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 100},
    "enum": {"enum": ["a", 1, None, {"x": [1]}]},
    "const": {"const": {"k": "hello"}},
    "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "prefixItems": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 2}, {"type": "boolean"}],
        "items": False,
    },
    "properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"const": 1}},
        "required": ["a", "b"],
    },
    "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
    "minProperties": {"type": "object", "properties": {k: {"type": "null"} for k in "abc"}, "minProperties": 2},
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^x[0-9]$": {"type": "integer"}},
        "additionalProperties": False,
    },
    "anyOf": {"anyOf": [{"type": "integer", "maximum": 0}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "integer", "minimum": 3, "maximum": 9}]},
    "$ref": {
        "$defs": {
            "N": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "maximum": 1},
                    "next": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
            }
        },
        "$ref": "#/$defs/N",
    },
    **{
        f"format {name}": {"type": "string", "format": name}
        for name in ["date", "time", "date-time", "email", "uuid", "hostname", "uri"]
    },
}


@pytest.fixture(scope="module")
def compiler(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=151936)
    return xgr.GrammarCompiler(info), info, tokenizer


def random_outputs(compiled, info, tokenizer, count: int, seed: int) -> list[str]:
    """Finished outputs from random allowed tokens; an output that does not finish in time is dropped."""
    rng, stops, outputs = np.random.default_rng(seed), np.array(info.stop_token_ids), []
    # Tokens that close a string, array or object: picked now and then so random outputs finish.
    closing = np.array([tokenizer.convert_tokens_to_ids(t) for t in ['"', "]", "}", '"}', '"]']])
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for _ in range(count):
        matcher, tokens = xgr.GrammarMatcher(compiled), []
        for _ in range(120):
            matcher.fill_next_token_bitmask(bitmask)
            allowed = np.flatnonzero(
                np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: info.vocab_size]
            )
            is_stop = np.isin(allowed, stops)
            if is_stop.all() or (is_stop.any() and rng.random() < 0.3):
                outputs.append(tokenizer.decode(tokens))
                break
            candidates = allowed[~is_stop]
            closers = candidates[np.isin(candidates, closing)]
            token = int(rng.choice(closers if closers.size and rng.random() < 0.2 else candidates))
            assert matcher.accept_token(token)
            tokens.append(token)
    return outputs


@pytest.mark.parametrize("name", list(ENFORCED))
def test_allowlisted_keywords_constrain_xgrammar(compiler, name):
    schema = check(ENFORCED[name])
    grammar_compiler, info, tokenizer = compiler
    compiled = grammar_compiler.compile_grammar(json_grammar(schema))  # the grammar both engines compile
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    outputs = random_outputs(compiled, info, tokenizer, count=12, seed=len(name))
    assert len(outputs) >= 2, "too few outputs finished to judge"
    for text in outputs:
        value = json.loads(text)  # strict: no raw control characters in strings
        validator.validate(value)
        if name.startswith("format ") and (fmt := name.split()[1]) in STRICT_FORMATS:
            assert STRICT_FORMATS[fmt](value), f"{fmt}: {value!r}"


def test_a_required_name_must_be_described():
    # xgrammar drops a requirement for a name not in properties: {} would pass as valid.
    error = refused({"type": "object", "required": ["a"]})
    assert "'a'" in error.message and "properties" in error.message
    check_schema({"type": "object", "properties": {"a": {}}, "required": ["a"]}, param="p", **LIMITS)


def test_property_names_that_are_keywords_are_still_schemas():
    schema = {"type": "object", "properties": {"default": {"type": "string", "maxLength": 5}, "maxLength": True}}
    check_schema(schema, param="p", **LIMITS)
    grammar = json_grammar(schema)
    assert "Regex(" in grammar and "_characters ::=" not in grammar  # the bounded string went the pattern way
