"""Ctrl-C and SIGTERM as a stop request that repeated signals cannot wedge."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from types import FrameType


class StopRequest:
    """Set by the first of `signals`; later ones change nothing.

    The handler only assigns a flag. A `threading.Event` takes a lock in `set()`: a second signal that
    arrived while the first handler held it ran the handler again on the same thread, which then waited on
    that lock for good (`raygate up` hung in its shutdown when a SIGTERM followed a Ctrl-C; 3 of 10
    processes flooded with SIGINT hung that way).
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._requested = False
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._requested = True

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Sleep until a stop is requested or `timeout_s` has passed; True if one was."""
        deadline = time.monotonic() + timeout_s
        while not self._requested:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(poll_s, left))
        return self._requested
