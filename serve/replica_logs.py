"""Inside a Serve replica: raygate's own loggers write to the replica's Serve log (the dashboard shows it)."""

from __future__ import annotations

import logging
from collections.abc import Iterable


class _ToServeLog(logging.Handler):
    """Hands records to Serve's `ray.serve` logger, whose handlers write the replica's log file."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def route_logs_to_serve(names: Iterable[str]) -> None:
    """Send the loggers `names` to the replica's Serve log; Serve only wires `ray.serve`."""
    for name in names:
        own = logging.getLogger(name)
        own.setLevel(logging.INFO)
        if not any(isinstance(h, _ToServeLog) for h in own.handlers):
            own.addHandler(_ToServeLog())
        own.propagate = False
