"""Tracker (overinterp/pipeline/tracking.py) after a crash: a RUNNING parent of the same --out is a
dead run's, marked KILLED; with the same settings it is continued, not doubled. Against a SQLite
MLflow store in tmp_path."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from overinterp.pipeline.tracking import FP_TAG, OUT_TAG, ROLE_TAG, Tracker, fingerprint_digest


@dataclass(frozen=True)
class _Config:
    tracking_uri: str
    out_dir: str
    experiment: str = "overinterp-test"
    seed: int = 0

    def fingerprint(self) -> dict:
        return {"seed": self.seed}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    exp = client.create_experiment("overinterp-test", artifact_location=f"file://{tmp_path}/mlartifacts")
    yield uri, client, exp
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)  # Tracker sets the URI process-wide


def _crashed_parent(client, exp, out: str, config) -> str:
    """A parent as a SIGKILLed driver leaves it: RUNNING forever."""
    run = client.create_run(exp, run_name="digits-crashed", tags={OUT_TAG: out, ROLE_TAG: "parent", FP_TAG: fingerprint_digest(config)})
    return run.info.run_id


def test_a_crashed_parent_with_other_settings_is_marked_killed(store, tmp_path):
    uri, client, exp = store
    out = str(tmp_path / "out")
    crashed = _crashed_parent(client, exp, out, _Config(uri, out, seed=1))
    other_out = _crashed_parent(client, exp, str(tmp_path / "elsewhere"), _Config(uri, out, seed=1))
    with Tracker(_Config(uri, out), "digits") as tracker:
        assert client.get_run(crashed).info.status == "KILLED"
        assert tracker.run_id != crashed and not tracker.resumed
        assert client.get_run(tracker.run_id).data.tags["overinterp.previous_run_id"] == crashed
    assert client.get_run(crashed).info.status == "KILLED"  # stays KILLED: its settings differ, so it is not continued
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert client.get_run(other_out).info.status == "RUNNING"  # another --out's run is not this lock's to judge


def test_a_crashed_parent_with_the_same_settings_is_killed_then_continued(store, tmp_path, monkeypatch):
    uri, client, exp = store
    out = str(tmp_path / "out")
    config = _Config(uri, out)
    crashed = _crashed_parent(client, exp, out, config)
    marked, real = [], MlflowClient.set_terminated

    def recording(self, run_id, status=None, *args, **kwargs):  # the KILLED in between, which the end state hides
        marked.append((run_id, status))
        return real(self, run_id, status, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", recording)
    with Tracker(config, "digits", previous_holder={"pid": 4242}) as tracker:
        assert marked == [(crashed, "KILLED")]
        assert tracker.resumed and tracker.run_id == crashed
        run = client.get_run(crashed)
        assert run.info.status == "RUNNING" and "overinterp.resumed_at" in run.data.tags
        assert run.data.tags["overinterp.took_over_from_pid"] == "4242"
    parents = client.search_runs([exp], f"tags.`{ROLE_TAG}` = 'parent' and tags.`{OUT_TAG}` = '{out}'")
    assert [(p.info.run_id, p.info.status) for p in parents] == [(crashed, "FINISHED")]  # one parent, continued


def test_rerunning_a_finished_run_continues_its_parent_and_children(store, tmp_path):
    """The same settings on the same --out, run to the end twice: one parent, one child per trial."""
    from overinterp.pipeline.trial import TrialSpec

    uri, client, exp = store
    config = _Config(uri, str(tmp_path / "out"))
    ids = []
    for _ in range(2):
        with Tracker(config, "digits") as tracker:
            tracker.child(TrialSpec("cnn", 0))
            ids.append(tracker.run_id)
    assert ids[0] == ids[1] and client.get_run(ids[0]).info.status == "FINISHED"
    parents = client.search_runs([exp], f"tags.`{ROLE_TAG}` = 'parent'")
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{ids[0]}'")
    assert len(parents) == 1 and [c.info.run_name for c in children] == [TrialSpec("cnn", 0).name]
    with Tracker(_Config(uri, config.out_dir, seed=1), "digits") as other:  # other settings: a parent of their own
        assert other.run_id != ids[0] and client.get_run(other.run_id).data.tags["overinterp.previous_run_id"] == ids[0]


def test_accuracies_are_logged_with_four_decimals_and_the_summary_keeps_them_exact(store, tmp_path):
    """A child's accuracy, its baseline's and the difference, per-epoch val accuracy and the
    parent's accuracy means read as 0.9753 in MLflow's tables; summary.json's values stay exact."""
    from types import SimpleNamespace

    from overinterp.pipeline.trial import TrialSpec

    uri, client, exp = store
    full, sub = TrialSpec("cnn", 0), TrialSpec("cnn", 0, subset="cnn-s0/backselect")
    acc_full, acc_sub = 355 / 364, 352 / 364  # 0.975274..., 0.967032...
    results = {full.name: {"accuracy": acc_full, "seconds": 12.3456, "finished_at": 1.7e9, "losses": [0.5, 0.123456789],
                           "val_accuracies": [0.5, 1 / 3]},
               sub.name: {"accuracy": acc_sub, "seconds": 7.0, "finished_at": 1.7e9}}
    plan = SimpleNamespace(full_trials=[full], subset_trials=[sub], baseline_of=lambda s: full if s.subset else None,
                           models=["cnn"], seeds=[0])
    summary = {"dataset": "digits", "fraction": 0.05, "n_keep": 4, "hw": 64, "selector": "backselect",
               "accuracy": {"cnn": {"full": [acc_full, 2 / 3], "bs-subset": [acc_sub]}},
               "sis": {"cnn": {"plain": {"n_with_sis": 3, "median_size": 5, "median_fraction": 5 / 64}}},
               "masked_confidence": {"cnn": {"median_confidence": 0.987654321, "accuracy": 1 / 7}}}
    exact = repr(summary)
    with Tracker(_Config(uri, str(tmp_path / "out")), "digits") as tracker:
        tracker.log_results(plan, {full.name: results[full.name]}, {sub.name: results[sub.name]}, summary, files=[])
    assert repr(summary) == exact  # the summary itself is not rounded

    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    assert runs[sub.name].data.metrics == {"accuracy": 0.967, "baseline_accuracy": 0.9753,
                                           "accuracy_minus_baseline": -0.0082, "seconds": 7.0}
    assert runs[full.name].data.metrics["accuracy"] == 0.9753 and runs[full.name].data.metrics["seconds"] == 12.3
    history = client.get_metric_history(runs[full.name].info.run_id, "val_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.5, 0.3333]
    losses = client.get_metric_history(runs[full.name].info.run_id, "train_loss")
    assert sorted(m.value for m in losses) == [0.123456789, 0.5]  # losses are plotted, not rounded
    parent = client.get_run(tracker.run_id).data.metrics
    assert parent["cnn.full.accuracy_mean"] == 0.821 and parent["cnn.full.accuracy_std"] == 0.2182
    assert parent["cnn.bs-subset.accuracy_mean"] == 0.967
    assert parent["cnn.masked.median_confidence"] == 0.9877 and parent["cnn.masked.accuracy"] == 0.1429
    assert parent["cnn.plain.median_sis_fraction"] == 5 / 64  # a count over the image's pixels: exact


def _schema(path: str) -> tuple[list, list]:
    """Each table, index and trigger with its definition's lines as a sorted list: MLflow's migrations
    rebuild some tables with their constraints in an order that follows Python's string hashing, so
    two stores MLflow builds itself can list one table's constraints in different orders."""
    import sqlite3

    def lines(sql):
        return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())

    with sqlite3.connect(path) as db:
        return (sorted(((kind, name, lines(sql)) for kind, name, sql in
                        db.execute("select type, name, sql from sqlite_master")), key=str),
                db.execute("select version_num from alembic_version").fetchall())


def test_a_new_sqlite_store_starts_as_a_copy_of_an_empty_one_at_mlflows_newest_schema(tmp_path, monkeypatch):
    """The copy is the store MLflow builds itself (tables, indexes, schema version; its Default
    experiment added on opening), the template is made once, and an existing store or another
    kind of URI is left alone."""
    import os

    from overinterp.pipeline.tracking import start_sqlite_store

    monkeypatch.chdir(tmp_path)  # MLflow's Default experiment lives under the working directory
    cache = tmp_path / "cache"
    copied, built = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    start_sqlite_store(f"sqlite:///{copied}", str(cache))
    (template,) = cache.iterdir()
    assert copied.exists() and mlflow.__version__ in template.name and not template.name.endswith(".part")
    MlflowClient(f"sqlite:///{built}").search_experiments()  # MLflow builds this one
    assert _schema(str(copied)) == _schema(str(built))
    opened = [(e.name, e.artifact_location) for e in MlflowClient(f"sqlite:///{copied}").search_experiments()]
    assert opened == [(e.name, e.artifact_location) for e in MlflowClient(f"sqlite:///{built}").search_experiments()] == [
        ("Default", f"{tmp_path}/mlruns/0")]

    made = template.stat().st_mtime_ns
    start_sqlite_store(f"sqlite:///{tmp_path}/c/mlflow.db", str(cache))  # the next new store: copied, the template kept
    assert (tmp_path / "c" / "mlflow.db").exists() and template.stat().st_mtime_ns == made
    before = copied.read_bytes()
    start_sqlite_store(f"sqlite:///{copied}", str(cache))  # an existing store is not replaced
    assert copied.read_bytes() == before
    start_sqlite_store("http://127.0.0.1:5000", str(cache))
    start_sqlite_store(f"sqlite:///{tmp_path}/d/mlflow.db", str(tmp_path / "a" / "mlflow.db" / "not-a-dir"))  # no cache: MLflow builds it
    assert not (tmp_path / "d" / "mlflow.db").exists() and sorted(os.listdir(cache)) == [template.name]


def test_a_template_or_copy_that_fails_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A full disk while copying the template into --out, or SQLite failing while the template is
    built (not an OSError): no .part file stays in --out or the cache, no error reaches the run,
    and MLflow then builds the store itself."""
    import errno
    import os
    import shutil

    import sqlalchemy.exc
    from mlflow.store.db import utils as db

    from overinterp.pipeline import tracking

    monkeypatch.chdir(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "out"
    real_copy = shutil.copyfile

    def full_disk(src, dst):
        with open(dst, "wb") as f:
            f.write(open(src, "rb").read()[:100])  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    tracking.start_sqlite_store(f"sqlite:///{out}/mlflow.db", str(cache))
    assert os.listdir(out) == [] and [p.name.endswith("-empty.db") for p in cache.iterdir()] == [True]
    monkeypatch.setattr(shutil, "copyfile", real_copy)

    def failing_sqlite(engine):
        raise sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("database or disk is full"))

    monkeypatch.setattr(db, "_initialize_tables", failing_sqlite)
    tracking.start_sqlite_store(f"sqlite:///{out}/mlflow.db", str(tmp_path / "cache2"))
    assert os.listdir(tmp_path / "cache2") == [] and os.listdir(out) == []
    monkeypatch.undo()
    assert MlflowClient(f"sqlite:///{out}/mlflow.db").search_experiments()[0].name == "Default"
