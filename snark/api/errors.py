"""One error shape for every route, and one table from exception to status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_new_tokens", "code": "..."}}

This is OpenAI's shape, so OpenAI clients raise their own exception types. Validation errors are
400 (OpenAI clients expect 400, not FastAPI's 422); anything that is not a ``SnarkError`` is a bug
in Snark and answers 500 without internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from snark.api.cancellation import ClientDisconnected
from snark.errors import Overloaded, SnarkError

log = logging.getLogger(__name__)


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: SnarkError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    body = error_body(exc.message, type_=exc.type, code=exc.code, param=exc.param)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _takes_form_fields(request: Request) -> bool:
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    return body_field is not None and isinstance(body_field.field_info, Form)


def _form_route_message(request: Request, exc: RequestValidationError) -> tuple[str, str | None] | None:
    """What a form route says when the body is not form fields at all, or a required field is empty
    (FastAPI reports both as "Field required")."""
    content_type = request.headers.get("content-type", "")
    path = request.url.path
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        sent = f"as {content_type.split(';')[0]}" if content_type else "without a Content-Type"
        return (
            f"POST {path} takes form fields (curl -F prompt=...), but the body was sent {sent}: send "
            "multipart/form-data or application/x-www-form-urlencoded fields, or POST JSON to /v1/chat/completions.",
            None,
        )
    form = exc.body if isinstance(exc.body, FormData) else FormData()
    for err in exc.errors():
        name = str(err.get("loc", ("",))[-1])
        if err.get("type") == "missing" and form.get(name) == "":
            return f"The form field {name} is empty: give it a value (curl -F {name}=...).", name
    return None


def _json_route_message(request: Request, exc: RequestValidationError) -> tuple[str, str | None] | None:
    """A JSON route whose body is not a JSON object: most often curl -d without a JSON content type."""
    if not any(
        err.get("type") == "model_attributes_type" and tuple(err.get("loc", ())) == ("body",) for err in exc.errors()
    ):
        return None
    content_type = request.headers.get("content-type", "").split(";")[0]
    if "json" not in content_type:
        sent = f"as {content_type}" if content_type else "without a Content-Type"
        return (
            f"The body was sent {sent}, not as JSON: send it with the header 'Content-Type: application/json' "
            "(curl -H 'Content-Type: application/json' -d '{...}').",
            None,
        )
    return "The request body must be a JSON object ({...}), not a list or a single value.", None


def _validation_message(request: Request, exc: RequestValidationError) -> tuple[str, str | None]:
    special = _form_route_message(request, exc) if _takes_form_fields(request) else _json_route_message(request, exc)
    if special is not None:
        return special
    problems = []
    param = None
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":  # loc is ("body", <character offset>): not a field
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            offset = err.get("loc", ("body", "?"))[-1]
            return f"The request body is not valid JSON ({detail} at character {offset}): send a JSON object.", None
        if _other_union_branch(err, errors):
            continue
        where = _field_path(err.get("loc", ()))
        param = param or where
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems), param


def _other_union_branch(err: Mapping[str, Any], errors: Sequence[Mapping[str, Any]]) -> bool:
    """A field that may be a string or a list of parts, sent as a list with a bad part, fails both
    ways: the "not a string" half only hides the real problem, deeper in the list."""
    loc = tuple(err.get("loc", ()))
    if not str(err.get("type", "")).endswith("_type") or len(loc) < 2:
        return False
    return any(
        len(o.get("loc", ())) > len(loc) and tuple(o["loc"][: len(loc) - 1]) == loc[:-1] for o in errors if o is not err
    )


def _field_path(loc: tuple) -> str:
    """``("body", "messages", 0, "content", "list[ContentPart]", 1, "fps")`` -> ``messages[0].content[1].fps``:
    the request's own path, without pydantic's names for the union branch it tried."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool", "dict"):
            continue  # a union branch: list[ContentPart], str, function-after[...]
        else:
            path += f".{part}" if path else str(part)
    return path or "request body"


def _http_error_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return f"No route {request.method} {request.url.path}: see /docs or docs/api.md for the endpoints."
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        methods = " or ".join(m.strip() for m in allowed.split(",") if m.strip()) or "another method"
        return f"{request.method} is not allowed on {request.url.path}: use {methods}."
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SnarkError)
    async def _snark_error(request: Request, exc: SnarkError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(request, exc)
        return JSONResponse(
            error_body(message, type_="invalid_request_error", code="invalid_request", param=param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(_http_error_message(request, exc), type_="invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(
                "Internal server error (a bug in Snark; see the server log).",
                type_="server_error",
                code="internal_error",
            ),
            status_code=500,
        )
