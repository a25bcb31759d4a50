"""The chaos drill's figures from its attempts and faults (benchmarks/chaos.py `summarize`, pure)."""

from __future__ import annotations

from benchmarks.chaos import Attempt, Fault, markdown, summarize


def test_outage_is_the_time_to_the_first_success_sent_after_the_fault() -> None:
    attempts = [
        Attempt(0.0, 1.0, "ok"), Attempt(0.5, 10.2, "200 cut"),  # in flight when the replica died
        Attempt(10.1, 10.1, "ConnectError"), Attempt(10.4, 10.5, "503 no_replica"),
        Attempt(12.5, 12.6, "503 no_replica"), Attempt(14.0, 15.0, "ok"), Attempt(15.0, 16.0, "ok"),
        Attempt(30.0, 31.0, "ok"),
    ]
    faults = [Fault("replica kill", 10.0, "SIGKILL"), Fault("Redis restart", 20.0), Fault("roll-out", 40.0)]
    result = summarize(attempts, faults, 60.0, 2)
    kill, redis, rollout = result["faults"]
    assert redis["outage_s"] == 0.0 and redis["new_requests_failed"] == {}  # the next request sent succeeded
    assert kill["outage_s"] == 4.0
    assert kill["new_requests_failed"] == {"ConnectError": 1, "503 no_replica": 2}
    assert kill["in_flight_failed"] == {"200 cut": 1}
    assert rollout["outage_s"] is None  # nothing succeeded after it: the whole run counts as the outage
    assert result["longest_outage_s"] == 60.0
    assert result["accepted_then_cut"] == 1 and result["ok"] == 4 and result["attempts"] == 8
    assert result["longest_without_success_s"] == 15.0  # 16.0 -> 31.0
    assert "| 10.0 s | replica kill (SIGKILL) | 4.0 s | ConnectError × 1, 503 no_replica × 2 | 200 cut × 1 |" \
        in markdown(result)
