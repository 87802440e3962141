"""Fault injection: a driver SIGKILLed in each stage, a Ray worker killed during selection, two runs
on one --out, signals, a full disk. Each run is a real `overinterp run` process; afterwards the store
passes `store check` and summary.json equals that of the undisturbed reference run (the session's
`smoke_reference`, tests/smoke_reference.py).

Marked `faults` (several minutes): `python -m pytest -m "not multinode and not faults and not browser"` skips them.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

import procs
from smoke_reference import ARGS, local_env as _env, summary as _summary

from overinterp.store.check import check_store

pytestmark = pytest.mark.faults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {1: "training 2 full-image models", 2: "selection", 3: "training", 4: "summary"}


def _argv(out: str) -> list[str]:
    """The reference run's command line on another --out."""
    return [sys.executable, "-m", "overinterp.cli", "run", *ARGS, "--out", out]


def _start(out: str) -> subprocess.Popen:
    return subprocess.Popen(_argv(out), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(out: str, timeout=900) -> str:
    p = subprocess.run(_argv(out), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _wait_line(proc: subprocess.Popen, needle: str, timeout=600) -> list[str]:
    """Read the job's output until a line contains `needle`; returns the lines read."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended before {needle!r}:\n{''.join(lines[-40:])}")
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen in {timeout} s")


def _store_clean(out: str) -> None:
    reports = check_store(out)
    assert reports and all(r.ok for r in reports), [r for r in reports if not r.ok]


def _drain(proc):
    threading.Thread(target=proc.stdout.read, daemon=True).start()


def _collect(proc) -> list[str]:
    """Read the rest of the job's output in the background; the list fills as lines arrive."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return lines


def _store_has_no_repeats(out: str) -> None:
    """What `overinterp store check` reports after a kill: missing ids are allowed (the rerun selects
    them), repeated or conflicting rows and unreadable files are not."""
    if not os.path.isdir(os.path.join(out, "selections")):
        return  # killed before any selection was written
    reports = check_store(out)
    assert all(r.repeated == r.conflicting == 0 and not r.unreadable for r in reports), [r for r in reports if not r.ok]


def _parents(out: str) -> list:
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("overinterp")
    assert exp is not None, "the runs were logged somewhere else than <out>/mlflow.db"
    return client.search_runs([exp.experiment_id], "tags.`overinterp.role` = 'parent'")


def _lock_taken_over(printed: str, out: str) -> bool:
    return "taking over the lock" in printed or not os.path.exists(os.path.join(out, ".overinterp.lock"))


def test_driver_killed_in_each_stage(smoke_reference, tmp_path):
    """One --out: its driver SIGKILLed in stage 1, the rerun killed in stage 2 (after a first shard)
    and in stage 3 (after a first subset trial, with others mid-training), and so on; the last rerun
    finishes with the undisturbed run's results, one MLflow parent, and no trial twice. After each kill
    every process of the dead run's local Ray has ended within 30 s."""
    out = str(tmp_path / "out")
    for stage in STAGES:
        proc = _start(out)
        printed = "".join(_wait_line(proc, f"stage {stage}/4"))
        if stage > 1:  # a rerun after a kill takes the dead driver's lock over
            assert _lock_taken_over(printed, out), printed[-2000:]
        if stage == 2:  # inside selection: once a first shard is written
            _wait_for(lambda: glob.glob(os.path.join(out, "selections", "*", "*", "*", "part-*.parquet")))
        if stage == 3:  # mid-trial: once the first subset trial has finished, the trials beside and after it have not
            _wait_for(lambda: len(_finished_trials(out)) > 2)  # the 2 full-image trials finished in stage 1
        _drain(proc)
        # its local Ray: GCS, raylet, workers (some mid-batch or mid-trial); not Ray's dashboard and runtime-env
        # agents, which run no overinterp code and notice their raylet's end on a timer of their own (over 30 s)
        names = {pid: p.cmdline.decode(errors="replace")[:160] for pid in procs.descendants(proc.pid) if (p := procs.read(pid))}
        ray_processes = [p for p, name in names.items() if not name.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))]
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its local Ray dies with it
        proc.wait(timeout=60)
        t0 = time.time()
        while [p for p in ray_processes if procs.running(p)] and time.time() - t0 < 30:
            time.sleep(0.2)
        assert not [p for p in ray_processes if procs.running(p)], f"stage {stage}: Ray processes outlived the driver: " + "; ".join(
            f"{p} {names.get(p, '?')}" for p in ray_processes if procs.running(p))
        if stage == 3:
            assert 2 < len(_finished_trials(out)) < 8  # killed with subset trials unfinished, some mid-epoch
        _store_has_no_repeats(out)
        parents = _parents(out)  # each rerun continued the first driver's parent: still one
        assert [p.info.status for p in parents] == ["RUNNING"], [(p.info.run_id, p.info.status) for p in parents]
    printed = _finish(out)
    assert _lock_taken_over(printed, out)
    assert _summary(out) == smoke_reference["summary"]
    _store_clean(out)
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("overinterp")
    parents = _parents(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the crashed runs' parent, continued
    assert "overinterp.resumed_at" in parents[0].data.tags
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len({c.info.run_name for c in children}) == len(children) == 8  # no trial twice


def _wait_for(found, timeout=300):
    t0 = time.time()
    while not found() and time.time() - t0 < timeout:
        time.sleep(0.05)


def _finished_trials(out: str) -> list[str]:
    return glob.glob(os.path.join(out, "trials", "*", "result.json"))


def test_a_killed_selection_worker_is_retried_without_duplicates_and_a_second_run_is_refused(smoke_reference, tmp_path):
    """A selection actor SIGKILLed mid-batch: its batch is selected again and stored once. And a
    second run started on the same --out while this one runs is refused in one line, leaving it
    undisturbed."""
    out = str(tmp_path / "out")
    proc = _start(out)
    _wait_line(proc, "stage 1/4")  # the lock is held from before stage 1 until the run ends
    second = subprocess.Popen(_argv(out), env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_line(proc, "stage 2/4")
    pid, t0 = None, time.time()
    while pid is None and time.time() - t0 < 300:
        pid = next(iter(procs.selecting()), None)
        time.sleep(0.05)
    assert pid is not None
    lines = _collect(proc)
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=900) == 0
    second_out, second_err = second.communicate(timeout=60)
    assert second.returncode == 2 and "is in use by another run" in second_err and second_err.count("\n") == 1, second_out + second_err
    time.sleep(0.5)  # the reader thread takes the last lines
    lost = [line for line in lines if "a selection worker was lost (" in line]
    assert lost and "selecting the images not yet stored again (attempt 2 of 3;" in lost[0], "".join(lines[-40:])
    assert _summary(out) == smoke_reference["summary"]
    _store_clean(out)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's background job starts


def test_sigterm_and_a_scripts_sigint_stop_the_run_cleanly(smoke_reference, tmp_path):
    """SIGTERM (`ray job stop`, a pod's termination, `timeout`) in training, and SIGINT sent by a
    script to a run started with SIGINT ignored, in selection: each stops the run in seconds with one
    line and exit 128 + the signal, releases the lock, leaves no Ray process behind and the MLflow
    parent KILLED, not RUNNING; the rerun continues that parent and ends with the undisturbed run's results."""
    out = str(tmp_path / "out")
    for stage, sig in ((2, signal.SIGINT), (3, signal.SIGTERM)):
        proc = subprocess.Popen(_argv(out), env=_env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_ignore_sigint)
        _wait_line(proc, f"stage {stage}/4")
        printed = _collect(proc)
        time.sleep(3)
        ray_processes = procs.descendants(proc.pid)  # its local Ray: GCS, raylet, workers
        assert ray_processes
        # SIGINT to the whole process group, as `kill -INT -PGID` from a script; SIGTERM to the driver, as
        # `ray job stop`, `timeout` and a pod's termination send it
        (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
        t0 = time.time()
        rc = proc.wait(timeout=120)
        time.sleep(0.5)
        text = "".join(printed)
        assert rc == 128 + sig, text[-3000:]
        assert time.time() - t0 < 60 and f"overinterp: stopped by {sig.name}: finished work is kept in --out" in text, text[-3000:]
        assert "*** SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
        assert not os.path.exists(os.path.join(out, ".overinterp.lock"))
        t0 = time.time()
        while [p for p in ray_processes if procs.running(p)] and time.time() - t0 < 30:
            time.sleep(0.5)
        assert not [p for p in ray_processes if procs.running(p)], "Ray processes left behind"
        assert [p.info.status for p in _parents(out)] == ["KILLED"]
        _store_has_no_repeats(out)
    _finish(out)
    assert _summary(out) == smoke_reference["summary"]
    parents = _parents(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


@pytest.fixture
def small_disk(tmp_path):
    """A 1,400 KiB tmpfs: a smoke run's outputs (about 2.2 MiB, most of it MLflow's database) overflow
    it in stage 3; yields (path, grow), grow() making it big enough. Needs the right to mount (root)."""
    where = tmp_path / "disk"
    where.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(where)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip() or mount.returncode}): the disk-full test needs root")
    try:
        yield str(where), lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_completes(smoke_reference, small_disk):
    where, grow = small_disk
    out = os.path.join(where, "out")
    full = subprocess.run(_argv(out), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    printed = full.stdout + full.stderr
    assert full.returncode == 1, printed[-3000:]
    assert full.stderr.strip().splitlines()[-1].startswith(f"overinterp: error: no space left on the device holding {out} ("), printed[-3000:]
    assert "Traceback" not in printed, printed[-5000:]
    _store_has_no_repeats(out)  # nothing half-written: every shard there reads
    grow()
    rerun = _finish(out)
    assert _summary(out) == smoke_reference["summary"]
    _store_clean(out)
    parents = _parents(out)
    assert [p.info.status for p in parents] == ["FINISHED"], rerun[-2000:]
