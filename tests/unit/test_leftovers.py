"""What a killed `raygate up` left running is stopped by the next start, and nothing that is not its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from raygate.leftovers import StackRecord, stop_leftovers


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _record_from_a_process_that_is_gone(directory: Path, pids: list[int]) -> None:
    """A `raygate up` that recorded `pids` and was then killed."""
    code = ("import sys, psutil; from pathlib import Path; from raygate.leftovers import StackRecord; "
            "StackRecord(Path(sys.argv[1])).write([psutil.Process(int(p)) for p in sys.argv[2:]])")
    subprocess.run([sys.executable, "-c", code, str(directory), *map(str, pids)], check=True)


def test_the_next_start_stops_what_a_killed_stack_left_and_only_that(tmp_path: Path) -> None:
    left, foreign, live_owners = _sleeper(), _sleeper(), _sleeper()
    try:
        _record_from_a_process_that_is_gone(tmp_path, [left.pid])
        mine = StackRecord(tmp_path)  # this process's own stack, still running: its record is left alone
        mine.write([psutil.Process(live_owners.pid)])
        (tmp_path / "999999.json").write_text('{"owner": [1, ')  # half a record: dropped
        stopped = stop_leftovers(tmp_path, grace_s=2)
        assert len(stopped) == 1 and stopped[0].startswith(f"{left.pid} (python")
        assert left.wait(5) is not None
        assert foreign.poll() is None and live_owners.poll() is None
        assert sorted(p.name for p in tmp_path.iterdir()) == [mine.path.name]
        mine.remove()
        assert not list(tmp_path.iterdir())
    finally:
        for p in (left, foreign, live_owners):
            p.kill()
            p.wait()


def test_a_pid_given_to_a_later_process_is_not_taken_for_the_recorded_one(tmp_path: Path) -> None:
    later = _sleeper()
    try:
        _record_from_a_process_that_is_gone(tmp_path, [later.pid])
        record = next(tmp_path.glob("*.json"))
        record.write_text(record.read_text().replace(str(psutil.Process(later.pid).create_time()), "1.5"))
        assert stop_leftovers(tmp_path, grace_s=1) == []
        assert later.poll() is None and not list(tmp_path.iterdir())
    finally:
        later.kill()
        later.wait()
