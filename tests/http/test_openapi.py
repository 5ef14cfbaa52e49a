"""/openapi.json tells the truth: for every operation it lists, bodies generated from its documented
schema are never refused with a 422 or a 500, nor with a 400 for a reason the schema could have said
(a type, a required field, an enum, a bound). What a schema cannot say may still be a 400: rules across
fields, the content behind a URL or inside a JSON text, what the server holds (voices, earlier answers),
token counts. Those reasons are listed below, each with why; any other 400 fails.

Bodies come from a small walker of the schema on hypothesis strategies, seeded (derandomized), a few
per operation, sent over real HTTP to a server on the tiny model whose limits are small (short answers).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from snark.app import create_app
from snark.config import load_settings
from tests.conftest import serve

EXAMPLES = 12  # bodies per operation

# Reasons a schema cannot state, as "path: status code param: message" patterns.
ALLOWED = {
    r"/infer/(image|video): 400 invalid_request (image|video)_url: Send exactly one of": "one field or the other",
    r": 400 (invalid_image|invalid_video|image_\w+|video_\w+) ": "what a URL or an upload holds",
    r": 400 \w+ (json_schema|response_format[.\w]*|tools\[\d+\]\.function\.\w+): ": "a schema inside the request",
    r": 400 \w+ stream_options: stream_options is only allowed with stream=true": "one field with another",
    r": 400 \w+ (messages|input)\b[^:]*: (?!Invalid request)": "how messages fit together, and what they refer to",
    r": 400 \w+ tool_choice: (?!tool_choice is \")": "a named tool among the tools",
    r": 400 \w+ (response_format|stop|top_logprobs|logprobs|n|modalities|audio[.\w]*|tool_choice): .*(with|without|"
    r"together|combined|needs|spoken|stream=true)": "one field with another",
    r": 400 \w+ (voice|audio\.voice): .*SNARK_TTS_VOICES": "the voices this server has",
    r": 400 context_length_exceeded ": "the prompt's length in tokens",
    r"/infer/video: 400 invalid_request video_end: ": "the end after the start",
    r"/tokenize: 400 \w+ (prompt|messages): Send either prompt": "one field or the other",
    r": 400 \w+ (tokens|prompt)[\[\]\d]*: \S+ is \d+, not a token id of this model": "the model's vocabulary",
    r"/v1/completions: 400 unsupported_parameter best_of: ": "best_of equal to n",
}

# Operations whose schema still admits bodies the route refuses (found by this test): each must still
# fail here, so whoever makes one keep its word removes it from this list in the same change.
PENDING: dict[str, str] = {
    "/v1/responses": "input items, tools and metadata are typed loosely (the refused fields' schema is done)",
}


def strategy(schema: dict, root: dict, refs: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """The values ``schema`` admits (the JSON Schema FastAPI writes), small ones first."""
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref not in refs:
            refs[ref] = st.deferred(lambda: strategy(resolve(root, ref), root, refs))
        return refs[ref]
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            rest = {k: v for k, v in schema.items() if k != key}
            return st.one_of([strategy({**rest, **branch}, root, refs) for branch in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([strategy({**schema, "type": k}, root, refs) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        return _numbers(schema, integer=kind == "integer")
    if kind == "string":
        if "contentMediaType" in schema:
            return st.binary(max_size=64)
        low = schema.get("minLength", 0)
        text = st.text(min_size=low, max_size=max(low, min(schema.get("maxLength", 12), 12)))
        return text.filter(re.compile(schema["pattern"]).search) if "pattern" in schema else text
    if kind == "array":
        low = schema.get("minItems", 0)
        items = st.lists(
            strategy(schema.get("items", {}), root, refs),
            min_size=low,
            max_size=max(low, min(schema.get("maxItems", 3), 3)),
        )
        if "contains" in schema:
            items = items.map(lambda value: [schema["contains"]["const"], *value])
        return items
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if properties:
            return st.fixed_dictionaries(
                {k: strategy(v, root, refs) for k, v in properties.items() if k in required},
                optional={k: strategy(v, root, refs) for k, v in properties.items() if k not in required},
            )
        return st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=schema.get("maxProperties", 3))
    return ANY_JSON


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)


def _numbers(schema: dict, *, integer: bool) -> st.SearchStrategy:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    above, below = "exclusiveMinimum" in schema, "exclusiveMaximum" in schema
    whole = st.integers(
        None if low is None else math.floor(low) + 1 if above else math.ceil(low),
        None if high is None else math.ceil(high) - 1 if below else math.floor(high),
    )
    if integer:
        return whole
    return whole | st.floats(low, high, allow_nan=False, allow_infinity=False, exclude_min=above, exclude_max=below)


def resolve(root: dict, ref: str) -> dict:
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def send(http: httpx.Client, method: str, path: str, media_type: str | None, body) -> httpx.Response:
    if media_type is None:
        return http.request(method, path)
    if media_type == "application/json":
        return http.request(method, path, json=body)
    fields, files = {}, {}
    for name, value in body.items():
        if value is None:
            continue  # a form has no null: the field is left out
        if isinstance(value, bytes):
            files[name] = ("upload.bin", value, "application/octet-stream")
        else:
            fields[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    if media_type == "multipart/form-data":
        return http.request(method, path, data=fields, files=files or {"": ("", b"")})
    return http.request(method, path, data=fields)


def verdict(path: str, reply: httpx.Response) -> str | None:
    """Why ``reply`` breaks the schema's word; None when it keeps it."""
    if reply.status_code < 400 or reply.status_code in (413, 503):
        return None
    if reply.status_code in (404, 405) and "{" in path:
        return None  # a path parameter the route does not know: the schema says nothing of which exist
    if reply.status_code != 400:
        return f"answered {reply.status_code}: {reply.text[:300]}"
    error = reply.json()["error"]
    said = f"{path}: 400 {error['code']} {error['param']}: {error['message']}"
    if any(re.search(pattern, said) for pattern in ALLOWED):
        return None
    return f"refused for a reason the schema could say: {said[:400]}"


@pytest.fixture(scope="module")
def server(test_settings, tiny_engine, speaker) -> Iterator[tuple[httpx.Client, dict]]:
    limits = load_settings(
        vlm_model=test_settings.vlm_model,
        max_new_tokens_limit=4,
        default_max_new_tokens=2,
        max_n=2,
        image_url_timeout_s=1,
        video_url_timeout_s=1,
    )
    with (
        serve(create_app(limits, engine=tiny_engine, speaker=speaker)) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        yield http, http.get("/openapi.json").json()


def operations(schema: dict) -> list[tuple[str, str, str | None, st.SearchStrategy]]:
    found = []
    refs: dict[str, st.SearchStrategy] = {}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            target = st.just(path)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    name = parameter["name"]
                    values = strategy(parameter["schema"], schema, refs).map(lambda v: quote(str(v), safe=""))
                    target = st.tuples(target, values).map(lambda pv, n=name: pv[0].replace(f"{{{n}}}", pv[1]))
            content = (operation.get("requestBody") or {}).get("content") or {None: {"schema": {}}}
            for media_type, media in content.items():
                body = strategy(media["schema"], schema, refs) if media_type else st.none()
                found.append((method.upper(), path, media_type, st.tuples(target, body)))
    return found


def keeps_its_word(http: httpx.Client, method: str, path: str, media_type: str | None, requests: st.SearchStrategy):
    """A check of one operation: each generated request is answered as its schema promised."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(requests)
    def check(request) -> None:
        target, body = request
        problem = verdict(path, send(http, method, target, media_type, body))
        assert problem is None, f"{method} {path} ({media_type}) {problem}; the body: {body!r}"

    return check


def test_every_operation_takes_the_bodies_its_schema_admits(server):
    http, schema = server
    found = operations(schema)
    assert {"/v1/chat/completions", "/infer/image", "/v1/audio/speech"} <= {path for _, path, _, _ in found}
    failures: list[str] = []
    for method, path, media_type, requests in found:
        try:
            keeps_its_word(http, method, path, media_type, requests)()
        except AssertionError as failed:
            if path not in PENDING:
                failures.append(str(failed).splitlines()[0][:700])
        else:
            if path in PENDING:
                failures.append(f"{method} {path} keeps its schema's word now: take it out of PENDING")
    assert not failures, "\n".join(failures)


def test_the_schema_shows_this_servers_limits(server):
    _, schema = server
    components = schema["components"]["schemas"]
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 4} in chat["max_tokens"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 2} in chat["n"]["anyOf"]
    image_form = schema["paths"]["/infer/image"]["post"]["requestBody"]["content"]
    assert list(image_form) == ["multipart/form-data"]  # it carries a file
    assert list(schema["paths"]["/infer/text"]["post"]["requestBody"]["content"]) == [
        "application/x-www-form-urlencoded"
    ]
