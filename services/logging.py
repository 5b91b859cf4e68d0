"""structlog set-up shared by every process: JSON lines when not on a terminal.

The standard library's logging (psycopg, grpc, asyncio, ...) goes through the same renderer
(structlog.stdlib.ProcessorFormatter on the root logger), so every line a process writes to
stderr has one format.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def _renderer() -> structlog.types.Processor:
    if sys.stderr.isatty() or os.environ.get("CDC_LOG_FORMAT") == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


def setup_logging(process: str) -> None:
    global _configured
    level = getattr(logging, os.environ.get("CDC_LOG_LEVEL", "INFO").upper(), logging.INFO)
    renderer = _renderer()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Standard-library records: the same fields (plus `logger`) and the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    structlog.contextvars.bind_contextvars(process=process)
    sys.excepthook = _log_unhandled
    _configured = True


def _log_unhandled(kind: type[BaseException], value: BaseException, tb: object) -> None:
    structlog.get_logger("cdc").critical("process.crashed", exc_info=(kind, value, tb))


def report_error(event: str, message: str) -> None:
    """One line on stderr: a structured `event` with `error` once logging is set up, else
    `error: message`."""
    if _configured:
        structlog.get_logger("cdc").error(event, error=message)
    else:
        print(f"error: {message}", file=sys.stderr)
