"""Bearer-token auth for every route but ``/health`` and the API docs, when ``SNARK_API_KEY`` is set.

A pure ASGI middleware rather than a route dependency, so nothing escapes it: the OpenAI routes,
the form endpoints, ``/metrics``, ``/`` and unknown paths (no route list to probe) alike.
``/health`` stays open because load balancers and orchestrators probe it without credentials; the
docs page and its OpenAPI schema stay open so a browser can read them (they describe the routes and
reveal no data; their "Authorize" button takes the key for the calls made from the page).
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from snark.api.errors import error_response
from snark.errors import Unauthorized

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def key_matches(token: str, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every key: no early exit, so timing reveals neither how
    much of a key matched nor which key it was."""
    presented = token.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


class BearerAuth:
    def __init__(self, app: ASGIApp, *, keys: tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("BearerAuth needs at least one key")
        self.app = app
        self.keys = tuple(key.encode("utf-8") for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        exc = Unauthorized(
            f"{_problem(scheme, token)}: send the header 'Authorization: Bearer <key>' with a key from SNARK_API_KEY."
        )
        response = error_response(exc)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def _problem(scheme: str, token: str) -> str:
    """What is wrong with the Authorization header, without echoing any of it."""
    if not scheme:
        return "No API key was sent"
    if scheme.lower() == "bearer":
        return "The API key is not valid"
    if not token:
        return "The Authorization header has no 'Bearer ' prefix before the key"
    return "The Authorization header uses another scheme than Bearer"


def document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI schema: /docs then shows an "Authorize" button, and the
    calls made from the page carry the key."""

    def schema() -> dict:
        if app.openapi_schema is None:
            built = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            built.setdefault("components", {})["securitySchemes"] = {
                "SNARK_API_KEY": {"type": "http", "scheme": "bearer"}
            }
            built["security"] = [{"SNARK_API_KEY": []}]
            app.openapi_schema = built
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema
