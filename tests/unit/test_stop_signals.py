"""`raygate up`'s stop request: Ctrl-C and SIGTERM, any number of them, never wedge the shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What `raygate up` does: wait for a stop, then shut down (busy Python code) while signals keep coming.
_PROGRAM = """
import os
import time
from raygate.signals import StopRequest
stop = StopRequest()
print("ready", flush=True)
while not stop.wait(1.0):
    pass
end = time.monotonic() + 1.5
while time.monotonic() < end:
    sum(range(1000))
print("stopped", flush=True)
os._exit(0)  # the signals go on: past this point the interpreter's own exit would die of the next one
"""


def test_a_flood_of_signals_during_shutdown_never_hangs_it() -> None:
    """With a `threading.Event` set from the handler, 3 of 10 such processes hung for good."""
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            end = time.monotonic() + 2.0
            sent = 0
            while time.monotonic() < end and proc.poll() is None:
                proc.send_signal(signal.SIGINT if sent % 2 else signal.SIGTERM)
                sent += 1
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0 and out == "stopped\n", (proc.returncode, out, err[-2000:])


def test_wait_times_out_without_a_signal() -> None:
    from raygate.signals import StopRequest

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopRequest()
        started = time.monotonic()
        assert stop.wait(0.3) is False and not stop.is_set()
        assert 0.25 < time.monotonic() - started < 2
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set() and stop.wait(5) is True
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
