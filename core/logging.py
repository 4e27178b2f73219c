"""structlog configuration: JSON lines when not on a terminal, console rendering on one."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


class _StderrLogger:
    """Writes each line to whatever sys.stderr is *now* (not the stream at configure time:
    a replaced or closed stream, e.g. under test capture, must not break a worker thread)."""

    def msg(self, message: str) -> None:
        # a closed stream (interpreter or capture teardown) drops the line
        with contextlib.suppress(ValueError):
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _StderrLoggerFactory:
    def __call__(self, *args: Any) -> _StderrLogger:
        return _StderrLogger()


def configure_logging(level: str = "info", *, service: str = "", json: bool | None = None) -> None:
    """Configure structlog once per process. `service` is bound to every event."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    use_json = (not sys.stderr.isatty()) if json is None else json

    def add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if service:
            event.setdefault("service", service)
        return event

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "idealrt") -> Any:
    return structlog.get_logger(name)
