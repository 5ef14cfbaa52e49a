"""Snark's log set-up for a served process: levels, progress as lines, quiet health checks."""

from __future__ import annotations

import logging
import os

from snark.config import Settings
from snark.progress import route_transformers_progress


class HealthCheckFilter(logging.Filter):
    """Drops uvicorn's access-log lines for ``/health``: probes every few seconds would bury the requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].split("?", 1)[0] != "/health"
        return True


def configure_logging(settings: Settings) -> None:
    """Snark's own INFO lines (load progress, timings) next to uvicorn's, unless logging is set up."""
    if not logging.getLogger().handlers:
        level = os.environ.get("SNARK_LOG_LEVEL", "info").upper()
        logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    _one_handler_for_libraries()
    route_transformers_progress()
    access = logging.getLogger("uvicorn.access")
    quiet = [f for f in access.filters if isinstance(f, HealthCheckFilter)]
    if not settings.log_health_checks and not quiet:
        access.addFilter(HealthCheckFilter())
    elif settings.log_health_checks:
        for f in quiet:
            access.removeFilter(f)


def _one_handler_for_libraries() -> None:
    """transformers and huggingface_hub add their own stderr handlers; with Snark's on the root logger
    each of their warnings would print twice. They go through the root handler alone, in its format."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
