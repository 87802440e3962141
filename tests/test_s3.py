"""The cluster's storage path through a real S3 endpoint (moto's server on loopback, tests/s3server.py),
with the clients users run, unmodified: pyarrow's S3 file system and Ray Data (a streamed run whose
--train, --val and --out are s3://), boto3 (the run's lock; a shard corrupted from outside) and
MLflow's artifact store (a tracking server started as cluster.yaml starts it, artifacts on S3).

One streamed run is shared by the tests below (module fixture `first_run`); while it holds its
--out, a second run on the same --out is started and must be refused. The run is the cheapest
streamed setup: 6 train and 6 val images of 40 px, resnet20 (the CIFAR ResNet, 1 MB checkpoints: moto serves
S3 from this process, ~6 MB/s) at 32 px, one epoch, three subset
trials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from overinterp import fs, store
from overinterp.pipeline.images import stable_id
from overinterp.synthetic import write_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))

import sis_imagenet  # noqa: E402

SELECTOR = ("resnet20", "bgsis-k64-keep0.1")


def _key(s3, uri: str) -> str:
    return uri.split(f"s3://{s3.bucket}/", 1)[1]


def _objects(s3, uri: str) -> dict[str, tuple]:
    """{key under uri: (ETag, LastModified)}: what "nothing rewritten" compares."""
    prefix = _key(s3, uri).rstrip("/") + "/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """`mlflow server` as cluster.yaml's head starts it: SQLite on local disk, --artifacts-destination
    on S3 (here the test bucket), loopback only. Yields (its URL, the s3:// artifact root)."""
    db = tmp_path_factory.mktemp("mlflow-server") / "mlflow.db"
    artifacts = s3_server.prefix("mlflow-artifacts")
    port = __import__("s3server").free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **s3_server.env}
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(db.parent / "server.log", "wb")
    proc = subprocess.Popen([mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > 90:
            proc.kill()
            raise AssertionError(f"mlflow server did not start:\n{(db.parent / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, artifacts
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker (its own session: nothing else)
    try:
        proc.wait(2)  # uvicorn's graceful stop waits for idle keep-alive connections
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()


def _run_args(root: str, weights: str, tracking: str) -> list[str]:
    return ["--train", f"{root}/data/train", "--val", f"{root}/data/val", "--model", "resnet20", "--weights", weights,
            "--num-classes", "3", "--image-size", "32", "--pixels-per-step", "64", "--epochs", "1", "--batch-size", "8",
            "--select-batch", "6", "--fill", "mean", "--out", f"{root}/out", "--tracking-uri", tracking]


def _job(args: list[str], env: dict, log_path) -> subprocess.Popen:
    """sis_imagenet.py in its own process with its own local Ray, as `python jobs/sis_imagenet.py` runs."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "sis_imagenet.py"), *args], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def first_run(s3_server, mlflow_server, tmp_path_factory):
    """The streamed run on s3://, and a second run on the same --out started while the first holds
    its lock. Returns a dict: root (s3:// URI), out, args, env, expected train ids, the first run's
    pid, exit code and output, the second's exit code and stderr."""
    import torch

    from overinterp.models import create_model

    tmp = tmp_path_factory.mktemp("s3-run")
    write_imagefolder(str(tmp / "data"), n_per_class=2, num_classes=3, size=40)
    root = s3_server.prefix("stream")
    s3_server.upload(str(tmp / "data"), f"{root}/data")
    weights = str(tmp / "w.pt")  # the explained model's weights stay local, as a user's --weights file would
    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=3).state_dict(), weights)
    args = _run_args(root, weights, mlflow_server[0])
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}, **s3_server.env,
           "PYTHONPATH": ROOT}
    lock_key = f"{_key(s3_server, root)}/out/.overinterp.lock"

    proc = _job(args, env, tmp / "first.log")
    c, t0 = s3_server.client(), time.time()
    while "Contents" not in c.list_objects_v2(Bucket=s3_server.bucket, Prefix=lock_key):  # the first run holds its --out
        assert proc.poll() is None, f"the first run ended before it took its lock:\n{(tmp / 'first.log').read_text()[-4000:]}"
        assert time.time() - t0 < 300, "the first run took no lock in 300 s"
        time.sleep(0.5)
    with pytest.MonkeyPatch.context() as mp:  # the second run: this process, the same shell environment
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        capture = tmp / "second.err"
        with open(capture, "w") as err:
            mp.setattr(sys, "stderr", err)
            second_rc = sis_imagenet.main(args)
    first_rc = proc.wait(600)
    expected = sorted(stable_id(f"{c}/{f}".encode()) for c in sorted(os.listdir(tmp / "data" / "train"))
                      for f in os.listdir(tmp / "data" / "train" / c))
    return dict(root=root, out=f"{root}/out", args=args, env=env, tmp=tmp, expected=expected, pid=proc.pid, rc=first_rc,
                log=(tmp / "first.log").read_text(), second_rc=second_rc, second_err=capture.read_text())


def test_a_streamed_run_reads_and_writes_s3(first_run, s3, mlflow_server):
    """--train/--val/--out on s3://: Ray Data reads the images from the bucket, the store, trials and
    summary are written there, the lock is gone at the end, and the MLflow server put the run's
    artifacts in the bucket."""
    assert first_run["rc"] == 0, first_run["log"][-4000:]
    out = first_run["out"]
    summary = fs.read_json(fs.join(out, "summary.json"))
    assert summary["images"] == {"train": 6, "test": 6} and summary["baseline"]["images"] == 6
    sel = store.read_selections(fs.join(out, "selections"), *SELECTOR, "train", expect_ids=first_run["expected"])
    assert sel.image_id.tolist() == first_run["expected"] and sel.order.shape == (6, 1024)
    keys = set(_objects(s3, out))
    assert {"summary.json", "trials/resnet20-bgsis-k64-keep0.1-s0/result.json", "trials/resnet20-random-seed0-s0/result.json"} <= keys
    assert ".overinterp.lock" not in keys  # released
    mlflow.set_tracking_uri(mlflow_server[0])
    parent = mlflow.search_runs(experiment_names=["overinterp-imagenet"], filter_string="tags.`overinterp.role` = 'parent'")
    assert len(parent) == 1
    run_id = parent["run_id"].iloc[0]
    assert any(k.endswith(f"/{run_id}/artifacts/plan.txt") for k in _objects(s3, mlflow_server[1])), "plan.txt is not in the bucket"


def test_a_second_run_on_the_same_s3_out_is_refused_while_the_first_holds_it(first_run):
    err = first_run["second_err"]
    assert first_run["second_rc"] == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sis_imagenet.py: error: {first_run['out']} is in use by another run (") and f"pid {first_run['pid']}," in err
    assert first_run["rc"] == 0  # the first run went on undisturbed


def test_the_rerun_resumes_from_the_s3_store(first_run, s3, tmp_path):
    """Nothing is selected or trained again, nothing in the store or trials is rewritten, and the
    summary is the same."""
    out = first_run["out"]
    before = {k: v for k, v in _objects(s3, out).items() if k.startswith(("selections/", "trials/"))}
    summary = fs.read_json(fs.join(out, "summary.json"))
    proc = _job(first_run["args"], first_run["env"], tmp_path / "rerun.log")
    rc = proc.wait(600)
    printed = (tmp_path / "rerun.log").read_text()
    assert rc == 0, printed[-4000:]
    for split in ("train", "test"):
        assert f"[bgsis-k64-keep0.1 resnet20/{split}] 6 of 6 images already selected; 0 to go" in printed
    assert "3 of 3 trials already finished" in printed
    assert {k: v for k, v in _objects(s3, out).items() if k.startswith(("selections/", "trials/"))} == before
    again = fs.read_json(fs.join(out, "summary.json"))
    assert again == summary
    assert sorted(store.raw_image_ids(fs.join(out, "selections"), *SELECTOR, "train").tolist()) == first_run["expected"]


def test_store_check_and_repair_on_s3(first_run, s3, capsys):
    """A garbage shard and a repeated shard written into the bucket with boto3: `store check` names
    them (exit 1), `store repair` moves the garbage to quarantine/ and keeps one copy of each row,
    and the store reads as before."""
    from overinterp.cli import main

    out = first_run["out"]
    split = f"{_key(s3, out)}/selections/{SELECTOR[0]}/{SELECTOR[1]}/train"
    c = s3.client()
    shard = next(k for k in _objects(s3, f"s3://{s3.bucket}/{split}") if k.endswith(".parquet"))
    c.copy_object(Bucket=s3.bucket, Key=f"{split}/part-1111111111111111.parquet", CopySource={"Bucket": s3.bucket, "Key": f"{split}/{shard}"})
    c.put_object(Bucket=s3.bucket, Key=f"{split}/part-0000000000000000.parquet", Body=b"PAR1 not really")
    capsys.readouterr()
    assert main(["store", "check", "--out", out]) == 1
    printed = capsys.readouterr().out
    assert f"| {SELECTOR[0]} | {SELECTOR[1]} | train | 6 | 3 | 6 | 0 | 0 | 1 |" in printed, printed
    assert "unreadable: " in printed and "part-0000000000000000.parquet" in printed
    assert main(["store", "repair", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "all 4 selections are consistent" in printed, printed
    assert any(k.endswith("part-0000000000000000.parquet") for k in _objects(s3, f"{out}/quarantine"))  # moved, not deleted
    assert main(["store", "check", "--out", out]) == 0
    sel = store.read_selections(fs.join(out, "selections"), *SELECTOR, "train", expect_ids=first_run["expected"])
    assert sel.image_id.tolist() == first_run["expected"]
    assert sorted(store.raw_image_ids(fs.join(out, "selections"), *SELECTOR, "train").tolist()) == first_run["expected"]
    assert ".overinterp.lock" not in _objects(s3, out)  # repair released its lock


def test_mlflow_server_stores_artifacts_on_s3(s3_server, mlflow_server, monkeypatch):
    """A client with no S3 credentials logs an artifact to the server; it lands in the bucket under
    --artifacts-destination and reads back through the server."""
    url, artifacts = mlflow_server
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)  # the client reaches S3 only through the server
    mlflow.set_tracking_uri(url)
    exp = mlflow.create_experiment(f"s3-artifacts-{time.time_ns()}")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_text("pixels removed: 90%", "notes/hello.txt")
    key = next((k for k in _objects(s3_server, artifacts) if k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt")), None)
    assert key is not None, _objects(s3_server, artifacts)
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{_key(s3_server, artifacts)}/{key}")["Body"].read()
    assert body == b"pixels removed: 90%"
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "pixels removed: 90%"
