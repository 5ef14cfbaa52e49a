"""One error shape for every route, and one table from exception to status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_new_tokens", "code": "..."}}

This is OpenAI's shape, so OpenAI clients raise their own exception types. Validation errors are
400 (OpenAI clients expect 400, not FastAPI's 422); anything that is not a ``SnarkError`` is a bug
in Snark and answers 500 without internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc is ("body", <character offset>): not a field
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            offset = err.get("loc", ("body", "?"))[-1]
            return f"The request body is not valid JSON ({detail} at character {offset}): send a JSON object.", None
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(loc) or "request body"
        param = param or where
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SnarkError)
    async def _snark_error(request: Request, exc: SnarkError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(
            error_body(message, type_="invalid_request_error", code="invalid_request", param=param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}: see README.md for the endpoints."
        return JSONResponse(
            error_body(message, type_="invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("Internal server error (a bug in Snark; see the server log).", type_="server_error", code="internal_error"),
            status_code=500,
        )
