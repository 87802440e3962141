"""The output lock (overinterp/pipeline/lock.py): taking over a dead holder's lock is atomic."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from overinterp.pipeline.lock import LOCK_NAME, LockHeld, OutputLock

DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: no such process


def _dead_lock(out) -> None:
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": DEAD_PID, "started": 0, "renewed": time.time(),
                                             "command": "overinterp run", "token": "dead"}))


class _PausedAfterJudging(OutputLock):
    """A run that judges the lock stale, then waits on `gate` before taking it over (the first time)."""

    def __init__(self, out_dir: str, gate):
        super().__init__(out_dir)
        self.gate = gate

    def _stale(self, holder):
        why = super()._stale(holder)
        gate, self.gate = self.gate, lambda: None
        gate()
        return why


def test_two_reruns_taking_over_one_dead_lock_exactly_one_wins(tmp_path):
    """Both reruns read the dead holder's lock and judge it stale; the first then takes it over, and
    only afterwards does the second act on its judgement. It must find the first's lock held, not
    delete it (what the delete-then-create takeover did: both won)."""
    _dead_lock(tmp_path)
    judged, first_done = threading.Event(), threading.Event()
    second = _PausedAfterJudging(str(tmp_path), lambda: (judged.set(), first_done.wait(10)))
    outcome = {}

    def run_second():
        try:
            second.acquire()
            outcome["second"] = "won"
        except LockHeld as e:
            outcome["second"] = str(e)

    t = threading.Thread(target=run_second)
    t.start()
    assert judged.wait(10)  # the second has read the dead holder and judged it stale
    first = OutputLock(str(tmp_path)).acquire()
    assert first.taken_over["pid"] == DEAD_PID
    first_done.set()
    t.join(10)
    try:
        assert outcome["second"].startswith(f"{tmp_path} is in use by another run (overinterp run on host {socket.gethostname()}, "
                                            f"pid {os.getpid()}"), outcome
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == first.me["token"]  # the first's lock is in place
        assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, LOCK_NAME + ".takeover"]  # the takeover flock file stays
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_many_threads_taking_over_one_dead_lock_exactly_one_wins(tmp_path, n=4):
    """A free-for-all (it can pass by luck with a racy takeover too; the test above is the one that fails for sure)."""
    _dead_lock(tmp_path)
    start, results = threading.Barrier(n), []

    def take():
        lock = OutputLock(str(tmp_path))
        start.wait()
        try:
            results.append(lock.acquire())
        except LockHeld:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    winners = [r for r in results if r is not None]
    assert len(results) == n and len(winners) == 1, results
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winners[0].me["token"]
    winners[0].release()


def test_check_free_refuses_a_live_holder_and_writes_nothing(tmp_path):
    with OutputLock(str(tmp_path), "overinterp store repair"):
        with pytest.raises(LockHeld, match=r"in use by another run \(overinterp store repair on host"):
            OutputLock(str(tmp_path)).check_free()
    _dead_lock(tmp_path)
    before = (tmp_path / LOCK_NAME).read_bytes()
    OutputLock(str(tmp_path)).check_free()  # a dead holder is no obstacle, and is left for the run to take over
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    OutputLock(str(tmp_path / "not-yet")).check_free()
    assert not (tmp_path / "not-yet").exists()
