"""The routes for operators: ``GET /health`` (503 while the model loads or failed to, 200 once requests
can be served) and ``GET /metrics`` (Prometheus text, see ``metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from snark.api.metrics import WithoutCreated
from snark.api.state import AppState, get_state
from snark.engine.base import EngineState

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness and readiness")
async def health(state: AppState = Depends(get_state)) -> JSONResponse:
    engine = state.engine
    if engine.state is EngineState.LOADING:
        return JSONResponse({"status": "loading"}, status_code=503)
    facts = engine.facts
    if not engine.healthy or facts is None:
        error = str(engine.load_error) if engine.load_error else engine.state.value
        return JSONResponse({"status": engine.state.value, "error": error}, status_code=503)
    body = {
        "status": "ok",
        "model": facts.name,
        "engine": facts.engine,
        "tiny_random_weights": facts.is_tiny,
        "device": facts.device,
        "dtype": facts.dtype,
        "attention": facts.attention,
        "max_batch_size": engine.max_batch_size,
        "requests_running": engine.num_running,
        "requests_waiting": engine.num_waiting,
        "tts": {"engine": state.speaker.engine_name, "loaded": state.speaker.loaded},
    }
    if facts.is_tiny:
        body["note"] = "random-weight test model: answers are noise (serve real weights with VLM_SIZE/VLM_MODEL)"
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: AppState = Depends(get_state)) -> Response:
    return Response(generate_latest(WithoutCreated(state.metrics.registry)), media_type=CONTENT_TYPE_LATEST)
