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
        assert tracker.parent_id != crashed and not tracker.resumed
        assert client.get_run(tracker.parent_id).data.tags["overinterp.previous_run_id"] == crashed
    assert client.get_run(crashed).info.status == "KILLED"  # stays KILLED: its settings differ, so it is not continued
    assert client.get_run(tracker.parent_id).info.status == "FINISHED"
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
        assert tracker.resumed and tracker.parent_id == crashed
        run = client.get_run(crashed)
        assert run.info.status == "RUNNING" and "overinterp.resumed_at" in run.data.tags
        assert run.data.tags["overinterp.took_over_from_pid"] == "4242"
    parents = client.search_runs([exp], f"tags.`{ROLE_TAG}` = 'parent' and tags.`{OUT_TAG}` = '{out}'")
    assert [(p.info.run_id, p.info.status) for p in parents] == [(crashed, "FINISHED")]  # one parent, continued
