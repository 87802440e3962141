"""The whole pipeline through a real local Ray, on the digits smoke subsample: outputs, MLflow,
resume after a rerun and after lost work."""

import json
import os

import mlflow
import pytest

from overinterp import store
from overinterp.config import SMOKE_SIZES, ConfigError, RunConfig
from overinterp.pipeline.run import run_pipeline

pytestmark = pytest.mark.ray
N_TRAIN, N_TEST = SMOKE_SIZES


@pytest.fixture(scope="module")
def smoke_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(smoke=True, seeds=(0, 1), out_dir=str(out))
    summary = run_pipeline(cfg)
    return cfg, out, summary


def _mtimes(out):
    found = {}
    for d, _, files in os.walk(out):
        for f in files:
            if f == "result.json" or f.endswith(".parquet"):
                found[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return found


def test_outputs(smoke_run):
    cfg, out, summary = smoke_run
    on_disk = json.load(open(out / "summary.json"))
    assert on_disk["accuracy"] == summary["accuracy"]
    for cond in ("full", "backselect", "random", "backselect_positions"):
        accs = summary["accuracy"]["digits_cnn"][cond]
        assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    assert set(summary["sis"]["digits_cnn"]) == {"plain", "ensemble", "input_dropout"}
    assert summary["n_keep"] == 4 and summary["hw"] == 64
    assert "| digits_cnn |" in (out / "summary.md").read_text()
    assert (out / "gallery.png").stat().st_size > 1000
    root = str(out / "selections")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        sel = store.read_selections(root, "digits_cnn-s0", "backselect", split, expect_n=n)
        assert sel.curve.shape == (n, 64)
        store.read_selections(root, "none", "random-seed0", split, expect_n=n)
    store.read_selections(root, "digits_cnn-ens2", "backselect", "test", expect_n=N_TEST)
    store.read_selections(root, "digits_cnn-drop0.2-s0", "backselect", "test", expect_n=N_TEST)
    for name in ("digits_cnn-full-s0", "digits_cnn-backselect-s1", "digits_cnn-random-s0", "digits_cnn-full-drop0.2-s1"):
        assert (out / "trials" / name / "model.pt").exists()


def test_mlflow_parent_and_children(smoke_run):
    cfg, out, summary = smoke_run
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["overinterp"])
    parent = runs[runs["run_id"] == summary["mlflow_run_id"]]
    assert len(parent) == 1 and parent.iloc[0]["params.fraction"] == "0.05"
    children = runs[runs["tags.mlflow.parentRunId"] == summary["mlflow_run_id"]]
    assert len(children) == 2 * 2 + 3 * 2  # full (+ dropout), and 3 subset conditions, 2 seeds each
    subsets = children[children["tags.condition"] != "full"]
    assert subsets["metrics.baseline_accuracy"].notna().all()
    full_s0 = summary["accuracy"]["digits_cnn"]["full"][0]
    bs_s0 = children[children["tags.mlflow.runName"] == "digits_cnn-backselect-s0"].iloc[0]
    assert bs_s0["metrics.baseline_accuracy"] == pytest.approx(full_s0)


def test_rerun_reuses_finished_work(smoke_run, capsys):
    cfg, out, summary = smoke_run
    before = _mtimes(out)
    again = run_pipeline(cfg)
    assert _mtimes(out) == before  # no trial retrained, no image reselected
    assert again["accuracy"] == summary["accuracy"]
    printed = capsys.readouterr().out
    assert "[full] 4 of 4 trials already finished" in printed and "; 0 to go" in printed


def test_lost_work_is_redone_without_duplicates(smoke_run):
    cfg, out, summary = smoke_run
    shard_dir = out / "selections" / "digits_cnn-s0" / "backselect" / "test"
    shard = sorted(shard_dir.glob("part-*.parquet"))[0]
    shard.unlink()
    (out / "trials" / "digits_cnn-random-s1" / "result.json").unlink()
    run_pipeline(cfg)
    store.read_selections(str(out / "selections"), "digits_cnn-s0", "backselect", "test", expect_n=N_TEST)
    assert (out / "trials" / "digits_cnn-random-s1" / "result.json").exists()


def test_other_settings_in_same_out_dir_are_refused(smoke_run):
    cfg, out, _ = smoke_run
    with pytest.raises(ConfigError, match="other settings"):
        run_pipeline(RunConfig(smoke=True, seeds=(0, 1), out_dir=str(out), fraction=0.1))
