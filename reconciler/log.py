"""structlog configuration: JSON lines on stdout for journald, or console for humans.

Log events, not sentences: stable snake_case event names with context as keys. Nothing
here may ever print a password: URLs and DSNs go through config.redact() first.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(fmt: str = "json", level: str = "info", *, stream: Any = None) -> None:
    out = stream if stream is not None else sys.stdout
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through stdlib logging (rq, asyncpg) stay quiet unless it matters,
    # and when it does they speak our format on our stream: one JSON line, traceback
    # included as a field (asyncpg's pool logs one per failed reconnect during an outage).
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def set_level(level: str) -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO))
    )
