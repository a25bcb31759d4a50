"""The gateway's logs: JSON lines carrying the request id, and an access log off the hot path.

Inside a Serve replica, records go to Serve's own handlers (`serve.replica_logs`); with `logging_config.encoding: JSON` Serve writes them as JSON with the
request id that HAProxy puts in `x-request-id` and the response echoes. A standalone
gateway process (`raygate gateway`) writes JSON lines itself (`configure`).

API keys and prompt text never reach a log: the gateway logs key ids and prefixes, and
nothing of a request body.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

OWN_LOGGERS = ("gateway", "serve", "models")
ACCESS_LOGGER = "gateway.access"

# The id of the request being served, set per request (a context key, not shared state).
REQUEST_ID: ContextVar[str | None] = ContextVar("raygate_request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, then any `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> logging.Handler:
    """JSON lines on `stream` (stderr) for raygate's loggers in a process of its own."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._raygate = True  # type: ignore[attr-defined]
    for name in OWN_LOGGERS:
        own = logging.getLogger(name)
        own.setLevel(level)
        own.handlers = [h for h in own.handlers if not getattr(h, "_raygate", False)]
        own.addHandler(handler)
        own.propagate = False
    return handler


def access_logger(enabled: bool) -> logging.Logger | None:
    """The access log, or None when off. Records are queued; a thread formats and writes them.

    The access logger hands its records to the handlers of its parent (`gateway`) from that
    thread, so the request path only pays for a queue put.
    """
    if not enabled:
        return None
    log = logging.getLogger(ACCESS_LOGGER)
    if any(isinstance(h, logging.handlers.QueueHandler) for h in log.handlers):
        return log
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    targets = logging.getLogger("gateway").handlers or logging.getLogger().handlers
    listener = logging.handlers.QueueListener(q, *targets, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)
    log.addHandler(logging.handlers.QueueHandler(q))
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
