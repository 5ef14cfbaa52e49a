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
    route_transformers_progress()
    access = logging.getLogger("uvicorn.access")
    quiet = [f for f in access.filters if isinstance(f, HealthCheckFilter)]
    if not settings.log_health_checks and not quiet:
        access.addFilter(HealthCheckFilter())
    elif settings.log_health_checks:
        for f in quiet:
            access.removeFilter(f)
