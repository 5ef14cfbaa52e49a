"""``GET /``: where to go from here (the interactive docs, the health check, the README)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from snark.api.state import AppState, get_state

router = APIRouter(tags=["operations"])


@router.get("/", summary="Where the docs are")
async def index(state: AppState = Depends(get_state)) -> dict:
    return {
        "name": "Snark",
        "model": state.engine.model_name,
        "message": "Snark serves Qwen2.5-VL over HTTP. Try the API in a browser at /docs; docs/api.md explains "
        "every endpoint and docs/configuration.md every setting.",
        "docs": "/docs",
        "openapi": "/openapi.json",
        "health": "/health",
    }
