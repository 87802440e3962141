"""The output lock (overinterp/pipeline/lock.py): of two runs exactly one wins, on a local path and
on a real S3 endpoint (moto's server, the `s3` fixture); a lock appears complete or not at all; a
holder that loses its lock stops."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from overinterp.pipeline import lock as lock_module
from overinterp.pipeline.lock import LOCK_NAME, LockHeld, LockLost, LockError, OutputLock

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


def _race(out: str, n: int, timeout: float) -> tuple[list, list]:
    """n threads take the lock of `out` at once: (each one's acquired lock or None, the winners)."""
    start, results = threading.Barrier(n), []

    def take():
        lock = OutputLock(out)
        start.wait()
        try:
            results.append(lock.acquire())
        except LockHeld:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results, [r for r in results if r is not None]


def _take_over_while_another_waits(out: str, join_s: float) -> tuple[OutputLock, str]:
    """A second rerun reads the dead holder's lock of `out` and judges it stale; only then does a first
    take it over (asserted), and afterwards the second acts on its judgement. Returns (the first's
    lock, "won" or the second's LockHeld message)."""
    judged, first_done = threading.Event(), threading.Event()
    second = _PausedAfterJudging(out, lambda: (judged.set(), first_done.wait(10)))
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
    first = OutputLock(out).acquire()
    assert first.taken_over["pid"] == DEAD_PID
    first_done.set()
    t.join(join_s)
    return first, outcome.get("second", "still running")


def test_two_reruns_taking_over_one_dead_lock_exactly_one_wins(tmp_path):
    """Both reruns read the dead holder's lock and judge it stale; the first then takes it over, and
    only afterwards does the second act on its judgement. It must find the first's lock held, not
    delete it (what the delete-then-create takeover did: both won)."""
    _dead_lock(tmp_path)
    first, second = _take_over_while_another_waits(str(tmp_path), join_s=10)
    try:
        assert second.startswith(f"{tmp_path} is in use by another run (overinterp run on host {socket.gethostname()}, "
                                            f"pid {os.getpid()}"), second
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == first.me["token"]  # the first's lock is in place
        assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, LOCK_NAME + ".takeover"]  # the takeover flock file stays
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_many_threads_taking_over_one_dead_lock_exactly_one_wins(tmp_path, n=4):
    """A free-for-all (it can pass by luck with a racy takeover too; the test above is the one that fails for sure)."""
    _dead_lock(tmp_path)
    results, winners = _race(str(tmp_path), n, timeout=20)
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


def test_an_unreadable_lock_is_an_error_not_stale(tmp_path):
    """A lock whose content cannot be parsed (a storage fault, a foreign file) names itself and the
    fix, and is left alone: judging it stale could hand a live run's output to a second run."""
    for content in (b"", b"{not json"):
        (tmp_path / LOCK_NAME).write_bytes(content)
        with pytest.raises(LockError, match=rf"{LOCK_NAME} is not a lock this program wrote .*delete it and rerun"):
            OutputLock(str(tmp_path)).acquire()
        assert (tmp_path / LOCK_NAME).read_bytes() == content
    (tmp_path / LOCK_NAME).unlink()
    (tmp_path / LOCK_NAME).mkdir()  # a read that fails in the storage itself (here: EISDIR) is an error too, never "no lock"
    with pytest.raises(LockError, match=rf"cannot read the lock .*{LOCK_NAME} \(.*\): check the storage and this machine's credentials, then rerun"):
        OutputLock(str(tmp_path)).acquire()
    with pytest.raises(LockError, match="cannot read the lock"):
        OutputLock(str(tmp_path)).check_free()  # a dry run is told the same
    assert (tmp_path / LOCK_NAME).is_dir()


def test_a_reader_never_sees_an_empty_local_lock(tmp_path, n=300):
    """Runs take and release the lock over and over while a reader reads it in a tight loop: every
    read finds a whole lock or none (an exclusive create followed by a write shows an empty file
    in between)."""
    import sys

    path, seen, done = tmp_path / LOCK_NAME, [], threading.Event()

    def read():
        while not done.is_set():
            try:
                seen.append(path.read_bytes())
            except FileNotFoundError:
                pass

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible, so the reader runs between create and write
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(n):
            OutputLock(str(tmp_path)).acquire().release()
    finally:
        done.set()
        reader.join(10)
        sys.setswitchinterval(switch)
    assert seen, "the reader never found the lock"
    assert all(json.loads(raw)["token"] for raw in seen), [raw for raw in seen if not raw][:3]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_holder_whose_lock_was_taken_stops_with_one_line(where, tmp_path, monkeypatch, request):
    """Another run replaces the lock (as a takeover after the lease does): the holder's next renewal
    fails (on S3 its If-Match), it interrupts the run, and leaving the lock raises LockLost naming
    the other run. The other run's lock stays."""
    monkeypatch.setattr(lock_module, "RENEW_S", 0.1)
    other = json.dumps({"host": "elsewhere", "pid": 7, "started": 0, "renewed": time.time(), "command": "overinterp run",
                        "token": "other"}).encode()
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        out = s3.prefix("lost")
        key = out.split(f"s3://{s3.bucket}/", 1)[1] + "/" + LOCK_NAME

        def replace():
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=other)

        def current():
            return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    else:
        out = str(tmp_path)

        def replace():
            (tmp_path / LOCK_NAME).write_bytes(other)

        def current():
            return (tmp_path / LOCK_NAME).read_bytes()

    t0 = None
    with pytest.raises(LockLost, match=rf"^{out} was taken over by another run \(overinterp run on host elsewhere, pid 7, .*\) "
                                       "while this run held it: this run stopped"):
        with OutputLock(out):
            replace()
            t0 = time.time()
            while time.time() - t0 < 10:
                time.sleep(0.01)  # the run's work: interrupted by the lock's thread
    assert time.time() - t0 < 5, "the run was not interrupted; it noticed only when it released the lock"
    assert current() == other


def test_s3_server_honours_conditional_writes(s3):
    """What the S3 lock relies on, checked on the test server itself: a create with If-None-Match: *
    fails when the key exists, a write with If-Match fails when the ETag is not the current one."""
    from botocore.exceptions import ClientError

    c, key = s3.client(), s3.prefix("cond").split("/", 3)[3]
    first = c.put_object(Bucket=s3.bucket, Key=key, Body=b"1", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError, match="PreconditionFailed"):
        c.put_object(Bucket=s3.bucket, Key=key, Body=b"2", IfNoneMatch="*")
    c.put_object(Bucket=s3.bucket, Key=key, Body=b"3", IfMatch=first)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        c.put_object(Bucket=s3.bucket, Key=key, Body=b"4", IfMatch=first)
    assert c.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == b"3"


def _s3_dead_lock(s3, out) -> str:
    key = out.split(f"s3://{s3.bucket}/", 1)[1] + "/" + LOCK_NAME
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=json.dumps({"host": socket.gethostname(), "pid": DEAD_PID, "started": 0,
                                                                         "renewed": time.time(), "command": "overinterp run", "token": "dead"}))
    return key


@pytest.mark.parametrize("found", ["no lock", "a dead holder's lock"])
def test_concurrent_runs_on_s3_exactly_one_wins(found, s3, n=4):
    """n runs take one s3:// output's lock at once: with If-None-Match (no lock yet) or If-Match on
    the dead holder's ETag (a takeover), exactly one write succeeds."""
    out = s3.prefix("race")
    if found != "no lock":
        _s3_dead_lock(s3, out)
    results, winners = _race(out, n, timeout=30)
    assert len(results) == n and len(winners) == 1, results
    assert winners[0].read()["token"] == winners[0].me["token"]
    winners[0].release()
    assert s3.keys(out) == []  # released: the lock object is deleted


def test_an_s3_takeover_with_a_stale_etag_loses(s3):
    """The second rerun judged the dead holder's lock stale, then the first took it over: the
    second's write, conditional on the ETag it judged, fails, and it finds the first's lock held."""
    out = s3.prefix("stale")
    _s3_dead_lock(s3, out)
    first, second = _take_over_while_another_waits(out, join_s=20)
    try:
        assert second.startswith(f"{out} is in use by another run (overinterp run on host {socket.gethostname()}, "
                                            f"pid {os.getpid()}"), second
        assert first.read()["token"] == first.me["token"]
    finally:
        first.release()


def test_an_s3_out_with_endpoint_options_in_its_uri(s3_server, monkeypatch):
    """`s3://bucket/prefix?endpoint_override=host:port&scheme=http` (pyarrow's URI options, no
    AWS_ENDPOINT_URL): the lock object is `prefix/.overinterp.lock` on that endpoint."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(k, s3_server.env[k])
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    plain = s3_server.prefix("query")
    out = f"{plain}?endpoint_override={s3_server.endpoint.split('://')[1]}&scheme=http"
    with OutputLock(out) as lock:
        assert s3_server.keys(plain) == [LOCK_NAME]
        assert lock.read()["token"] == lock.me["token"]
    assert s3_server.keys(plain) == []
