"""The ``app`` that ``uvicorn snark.server:app`` serves, built from the environment's settings.

It is built on first access, not at import, so importing this module reads no settings; the app
itself comes from ``snark.app.create_app``, which tests and embedders call with their own parts.
"""

from __future__ import annotations

from fastapi import FastAPI

from snark.app import create_app
from snark.config import load_settings
from snark.logs import configure_logging


def __getattr__(name: str) -> FastAPI:
    # `uvicorn snark.server:app` looks `app` up here: the app is built from the environment on first
    # access, not at import, so importing snark.server (tests, create_app users) reads no settings.
    if name == "app":
        settings = load_settings()
        configure_logging(settings)
        globals()["app"] = application = create_app(settings)
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
