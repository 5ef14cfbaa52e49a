"""The OpenAPI schema at /openapi.json, true to what the routes accept on this server.

Clients generate code from it, so a body the schema admits should be one the route takes. Two things
pydantic cannot write on its own are filled in once, when the schema is first built:

- bounds that are this server's settings (``up_to("max_new_tokens_limit")`` on a field): the
  setting's value becomes the field's ``maximum``;
- a form with a file field is ``multipart/form-data`` (FastAPI documents a form model as
  ``application/x-www-form-urlencoded``, which cannot carry a file).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import JsonDict

from snark.config import Settings

_SETTING = "x-snark-maximum-setting"


def up_to(setting: str) -> JsonDict:
    """``json_schema_extra`` of a field whose largest value is the setting ``setting`` (a field name)."""
    return {_SETTING: setting}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` build the schema with this server's bounds and form media types."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _fill_setting_bounds(schema, settings)
            _files_are_multipart(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fill_setting_bounds(node: Any, settings: Settings) -> None:
    if isinstance(node, dict):
        setting = node.pop(_SETTING, None)
        if setting is not None:
            maximum = getattr(settings, setting)
            for branch in node.get("anyOf", [node]):  # an optional field: its number branch
                if branch.get("type") in ("integer", "number"):
                    branch["maximum"] = maximum
        for value in node.values():
            _fill_setting_bounds(value, settings)
    elif isinstance(node, list):
        for value in node:
            _fill_setting_bounds(value, settings)


def _files_are_multipart(schema: dict[str, Any]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        content = (operation.get("requestBody") or {}).get("content", {})
        form = content.get("application/x-www-form-urlencoded")
        if form is None:
            continue
        body = form["schema"]
        if "$ref" in body:
            body = components.get(body["$ref"].rsplit("/", 1)[-1], {})
        if "contentMediaType" in str(body.get("properties", {})):
            content["multipart/form-data"] = content.pop("application/x-www-form-urlencoded")
