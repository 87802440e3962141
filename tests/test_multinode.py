"""The pipeline on simulated multi-node clusters: Ray's fake autoscaler shaped like cluster.yaml, and
ray.cluster_utils.Cluster for losing a node.

Marked `multinode` (minutes each): `python -m pytest -m "not multinode and not faults and not browser"` is the quick loop.
Every run here is a subprocess, as a user's driver would be: the test process keeps its own local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clusters import ActorSampler, start_fake_cluster
from smoke_reference import ARGS, local_env as _local_env, summary as _summary

from overinterp import store

pytestmark = pytest.mark.multinode
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERINTERP = [sys.executable, "-m", "overinterp.cli"]


def _run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def fake_cluster():
    cluster = start_fake_cluster(gpu_workers=3)
    yield cluster
    cluster.stop()


def _gpus(actor: dict) -> float:
    """GPUs an actor holds. Actors in a placement group (Tune trials, Train workers) list theirs as
    `GPU_group_<pg>` and `GPU_group_<bundle>_<pg>` (the same GPU twice), others as `GPU`."""
    held = actor["required_resources"]
    return max([held.get("GPU", 0)] + [v for k, v in held.items() if k.startswith("GPU_group_")])


def _say(capsys, line: str) -> None:
    """A line for the closing note, in a plain `python -m pytest` run's output too (not only with -s)."""
    with capsys.disabled():
        print(f"\n{line}", flush=True)


def test_smoke_run_spreads_over_gpu_workers_and_matches_one_node(fake_cluster, smoke_reference, tmp_path, capsys):
    out = str(tmp_path / "cluster")
    with ActorSampler(fake_cluster.dashboard, fake_cluster.env) as sampler:
        p = _run([*OVERINTERP, "run", *ARGS, "--out", out, "--ray-address", fake_cluster.address], fake_cluster.env)
    assert "resources (autoscaler config" in p.stdout and "GPU actor(s)" in p.stdout  # planned from capacity, printed

    selection = sampler.concurrent("SelectionWorker")
    assert any(selection), f"no selection actor seen in {len(sampler.samples)} samples; sampling errors: {sampler.errors[-3:]}"
    best = max(selection, key=lambda alive: len({a["node_id"] for a in alive}))
    assert len({a["node_id"] for a in best}) >= 2, f"never 2 selection actors on different nodes at once: {[len(a) for a in selection]}"
    _say(capsys, f"SPREAD most selection actors alive at once: {len(best)} on {len({a['node_id'] for a in best})} nodes; "
                 f"GPU nodes started: {len(sampler.gpu_nodes_seen)}")
    seen = [a for alive in selection for a in alive]
    assert seen and all(_gpus(a) >= 1 for a in seen)
    trials = [a for alive in sampler.concurrent("ImplicitFunc") for a in alive]
    assert trials and all(_gpus(a) >= 1 for a in trials)
    assert len(sampler.gpu_nodes_seen) >= 2, "the autoscaler started fewer than 2 GPU workers"
    # it never launched past max_workers and then killed a node with its trial (see clusters.autoscaler_config)
    monitor = open(os.path.join(fake_cluster.temp_dir, "session_latest", "logs", "monitor.log")).read()
    assert "(max_workers_per_type)" not in monitor, "the autoscaler launched more than max_workers and terminated a node"

    # the same command on one node (the embedded local Ray) gives the same store and summary
    local = smoke_reference["out"]
    assert _summary(out) == smoke_reference["summary"]
    for model, sel, split in store.list_selections(os.path.join(local, "selections")):
        a = store.read_selections(os.path.join(out, "selections"), model, sel, split)
        b = store.read_selections(os.path.join(local, "selections"), model, sel, split)
        assert np.array_equal(a.image_id, b.image_id) and a.order.equal(b.order), (model, sel, split)


def test_the_imagenet_jobs_smoke_test_on_the_autoscaling_cluster(fake_cluster, tmp_path):
    """The streamed backend, as `ray job submit -- python jobs/sis_imagenet.py` runs it. (The in-memory
    backend, which jobs/sis_cifar10.py presets, runs on this cluster in the test above.)"""
    out = str(tmp_path / "out")
    with ActorSampler(fake_cluster.dashboard, fake_cluster.env) as sampler:
        _run([sys.executable, os.path.join("jobs", "sis_imagenet.py"), "--smoke-test", "--out", out], fake_cluster.env)
    summary = _summary(out)
    assert summary["accuracy"]
    selection = [a for alive in sampler.concurrent("SelectionWorker") for a in alive]
    assert selection, f"no selection actor seen in {len(sampler.samples)} samples; sampling errors: {sampler.errors[-3:]}"
    assert all(_gpus(a) >= 1 for a in selection)
    # the trials hold the GPUs (a one-worker streamed trial trains in its Tune trial's own process)
    trials = [a for alive in sampler.concurrent("ImplicitFunc") for a in alive]
    assert trials and all(_gpus(a) >= 1 for a in trials)


# --- losing workers ------------------------------------------------------------------------------


def test_selection_survives_a_lost_node_exactly_once(tmp_path, capsys):
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "node_loss.py"), "selection", out], env=_local_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["removed_node"] and 0 < report["shards_before_removal"] < report["train_batches"], report  # removed mid-selection
    assert report["lost_worker_lines"], f"the job never said it lost a selection worker: {p.stderr[-3000:]}"
    root = os.path.join(out, "selections")
    for model, sel, split in store.list_selections(root):
        ids = store.raw_image_ids(root, model, sel, split)
        assert len(ids) == len(np.unique(ids)), f"{model}/{sel}/{split}: an image stored twice"
    for split, n in (("train", 96), ("test", 48)):
        store.read_selections(root, "digits_cnn-s0", "backselect", split, expect_n=n)  # every image, once
    _say(capsys, f"NODE-LOSS {json.dumps(report)}: every image of train (96) and test (48) stored exactly once")


@pytest.mark.parametrize("mode", ["train-worker", "trial-process"])
def test_a_killed_trainer_resumes_from_its_last_epoch(tmp_path, mode):
    """train-worker: one of a DDP trial's two Train workers (one per node, gloo) is SIGKILLed after
    the first checkpoint, and Train restarts the worker group from it. trial-process: a one-worker
    trial trains in its Tune trial's process; that process is SIGKILLed after its first epoch state
    is written, and Tune's retry of the trial goes on from it. Either way the trial ends with every
    val image evaluated (DDP's val of 11 images is split over the workers in unequal shares, so no
    share-equalising drops one), and each epoch reached the trial's MLflow child run as it trained."""
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "node_loss.py"), mode, out], env=_local_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["killed_pid"]
    result = json.load(open(os.path.join(out, "trials", report["trial"], "result.json")))
    assert result["resumed_from_epochs"], "the trial restarted from scratch instead of its checkpoint"
    assert result["workers"] == (2 if mode == "train-worker" else 1)
    # a one-worker trial keeps its epochs' metrics in its state: every epoch once (Train's frame may repeat one)
    assert len(result["losses"]) == 4 if mode == "trial-process" else len(result["losses"]) >= 3
    assert not os.path.exists(os.path.join(out, "trials", report["trial"], "state.pt"))  # resuming state, gone once finished
    assert result["val_images"] == (11 if mode == "train-worker" else 12), "val accuracy was not computed over the whole val split"
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (child,) = client.search_runs([client.get_experiment_by_name("overinterp-imagenet").experiment_id],
                                  f"attributes.run_name = '{report['trial']}'")
    history = client.get_metric_history(child.info.run_id, "val_accuracy")
    assert {m.step for m in history} == {0, 1, 2, 3}, history  # each epoch logged (one may repeat after the resume)
