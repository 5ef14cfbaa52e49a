"""The app factory: ``create_app`` assembles the FastAPI app from its parts (routes, middlewares,
error handlers, the engine, the speaker). ``snark.server`` holds the ``app`` that ``uvicorn
snark.server:app`` serves.

``create_app`` takes its parts (settings, engine, speaker) so tests and embedders can pass real
ones built their own way; nothing heavy happens at import: the model loads in the engine's worker
thread once the app starts, and ``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from snark.api import completions, forms, index, openai, operations, responses, tokenization
from snark.api.auth import BearerAuth, document_bearer_auth
from snark.api.body_limit import BodySizeLimit
from snark.api.errors import install_error_handlers
from snark.api.in_flight import InFlight, TrackInFlight
from snark.api.metrics import Metrics
from snark.api.openapi import install_openapi
from snark.api.state import AppState
from snark.config import Settings, load_settings
from snark.engine.base import Engine, EngineState
from snark.engine.build import build_engine
from snark.media import ImageLimits
from snark.speech import LazySpeaker, build_speaker
from snark.video.load import VideoLimits, VideoLoader

log = logging.getLogger(__name__)


def _shut_down_on_load_failure(exc: BaseException) -> None:
    # uvicorn shuts down on SIGTERM and then re-raises it, so the process exits non-zero.
    log.error("Snark cannot serve without a model; shutting down.")
    signal.raise_signal(signal.SIGTERM)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    speaker: LazySpeaker | None = None,
    on_load_failed: Callable[[BaseException], None] | None = _shut_down_on_load_failure,
) -> FastAPI:
    """The app. ``on_load_failed`` runs (in the engine thread) if the model cannot load; by default
    it stops the process so a supervisor sees the failure instead of a server that never gets ready."""
    settings = settings or load_settings()
    engine = engine or build_engine(settings)
    state = AppState(
        settings=settings,
        engine=engine,
        speaker=speaker or build_speaker(settings),
        image_limits=ImageLimits.from_settings(settings),
        metrics=Metrics(engine),
        videos=VideoLoader(VideoLimits.from_settings(settings)),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owns_engine = not engine.started
        if owns_engine:
            engine.start(on_load_failed=on_load_failed)
        yield
        if owns_engine:
            # A model still loading cannot be interrupted: waiting for it would hold the stop for as long
            # as the load (or the hub's retries) takes.
            # Off the loop: an engine on this loop (vLLM) shuts its requests down on it meanwhile.
            await asyncio.to_thread(engine.stop, 0.0 if engine.state is EngineState.LOADING else 30.0)
        # Sentences still being synthesized finish first: a voice thread inside onnxruntime when the
        # interpreter exits aborts the process ("terminate called without an active exception").
        await asyncio.to_thread(state.voices.pool.close, wait=True)

    app = FastAPI(
        title="Snark",
        summary="Qwen2.5-VL over HTTP: form endpoints, an OpenAI-compatible API, metrics and spoken replies.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.snark = state
    install_error_handlers(app)
    app.include_router(index.router)
    app.include_router(operations.router)
    app.include_router(forms.router)
    app.include_router(openai.router)
    app.include_router(completions.router)
    app.include_router(tokenization.router)
    app.include_router(responses.router)
    # The last middleware added runs first: auth refuses a stranger before any body byte is read.
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(BearerAuth, keys=settings.api_keys)
        document_bearer_auth(app)
    install_openapi(app, settings)  # this server's bounds in /openapi.json
    app.state.in_flight = in_flight = InFlight()  # what a stop past its grace period ends (snark serve)
    app.add_middleware(TrackInFlight, in_flight=in_flight)
    return app
