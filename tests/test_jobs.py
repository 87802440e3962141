"""jobs/: both entry points through a real local Ray — smoke tests, a folder of JPEG/PNG files
written here, resume, and bad input. Parquet of encoded images through two DDP workers per trial:
tests/test_multinode.py (the killed Train worker)."""

import dataclasses
import json
import os
import sys

import mlflow
import pytest
import torch

from overinterp import store
from overinterp.config import RunConfig
from overinterp.models import create_model
from overinterp.pipeline.images import stable_id
from overinterp.synthetic import write_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))

import sis_cifar10  # noqa: E402
import sis_imagenet  # noqa: E402

pytestmark = pytest.mark.ray


def test_cifar10_smoke_test(ray_session, tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "out"
    assert sis_cifar10.main(["--smoke-test", "--out", str(out)]) == 0
    assert [p for p in os.listdir(tmp_path / "tmp") if p.startswith("sis_cifar10")] == []  # its data went with it; the results are in --out
    summary = json.load(open(out / "summary.json"))
    assert summary["dataset"] == "cifar10" and summary["selector"] == "bgsis-k128-keep0.05"
    assert set(summary["accuracy"]["resnet20"]) == {"full", "full+dropout", "bgsis-subset", "random-subset", "bgsis-positions-only"}
    sel = store.read_selections(str(out / "selections"), "resnet20-s0", "bgsis-k128-keep0.05", "train", expect_n=20)
    assert sel.height == 32 and sel.order.shape == (20, 1024)


@pytest.fixture
def resnet18_weights(tmp_path):
    path = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=3).state_dict(), path)
    return str(path)


def _args(train, val, weights, out):
    return ["--train", train, "--val", val, "--model", "tv:resnet18", "--weights", weights, "--num-classes", "3",
            "--image-size", "32", "--pixels-per-step", "64", "--epochs", "1", "--batch-size", "8", "--select-batch", "6",
            "--out", out]


def test_imagenet_folder_of_jpegs_and_resume(ray_session, tmp_path, resnet18_weights, capsys):
    write_imagefolder(str(tmp_path / "data"), n_per_class=4, num_classes=3, size=40)
    out = str(tmp_path / "out")
    args = _args(str(tmp_path / "data" / "train"), str(tmp_path / "data" / "val"), resnet18_weights, out)
    assert sis_imagenet.main(args) == 0
    root = os.path.join(out, "selections")
    sel = store.read_selections(root, "tv_resnet18", "bgsis-k64-keep0.1", "train")
    expected_ids = sorted(stable_id(f"{c}/{f}".encode()) for c in sorted(os.listdir(tmp_path / "data" / "train"))
                          for f in os.listdir(tmp_path / "data" / "train" / c))
    assert sel.image_id.tolist() == expected_ids  # ids: hashes of class/file paths, stable across runs
    assert sel.order.shape == (12, 1024) and set(sel.label.tolist()) == {0, 1, 2}
    assert len(store.read_selections(root, "none", "random-seed0", "test").image_id) == 12
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["baseline"]) == {"full", "own_subsets", "images"} and summary["n_keep"] == 103
    assert summary["baseline"]["images"] == 12 and summary["images"] == {"train": 12, "test": 12}
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["overinterp-imagenet"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(children) == 3 and (children["metrics.baseline_accuracy"] == summary["baseline"]["full"]).all()
    child = children[children["tags.mlflow.runName"] == "tv_resnet18-bgsis-k64-keep0.1-s0"]
    epochs = mlflow.MlflowClient().get_metric_history(child["run_id"].iloc[0], "val_accuracy")
    assert [m.step for m in epochs] == [0], epochs  # the epoch's report from the one-worker trial's own process
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["metrics.plan.cost.eta_s"] > 0 and parent["metrics.plan.cost.forward_passes"] > 0  # the cost plan, as run_pipeline logs it
    plan_txt = mlflow.artifacts.load_text(f"runs:/{parent['run_id']}/plan.txt")
    assert "resources (" in plan_txt and "cost (" in plan_txt and "selection  tv:resnet18/pretrained bgsis-k64-keep0.1 train" in plan_txt
    assert set(summary["accuracy"]["tv:resnet18"]) == {"bgsis-subset", "random-subset", "bgsis-positions-only"}
    result = json.load(open(os.path.join(out, "trials", "tv_resnet18-bgsis-k64-keep0.1-s0", "result.json")))
    assert result["val_images"] == 12 and len(result["losses"]) == 1  # every val image, one epoch
    assert result["workers"] == 1 and not os.path.exists(os.path.join(out, "trials", "tv_resnet18-bgsis-k64-keep0.1-s0", "state.pt"))
    timing = result["timing"]  # where the trial's time went (one worker: it trains in the trial's process, no group to start)
    assert timing["fit_s"] >= timing["worker_start_s"] + sum(timing["epoch_s"]) and 0 <= timing["worker_start_s"] < 1
    assert len(timing["epoch_s"]) == len(timing["first_batch_s"]) == 1 and 0 < timing["first_batch_s"][0] <= timing["epoch_s"][0]

    capsys.readouterr()
    mtimes = {p: os.stat(p).st_mtime_ns for p in (os.path.join(out, "trials", "tv_resnet18-random-seed0-s0", "result.json"),)}
    assert sis_imagenet.main(args) == 0  # resume: nothing redone
    printed = capsys.readouterr().out
    assert "[bgsis-k64-keep0.1 tv_resnet18/train] 12 of 12 images already selected; 0 to go" in printed
    assert "3 of 3 trials already finished" in printed
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items())
    assert sorted(store.raw_image_ids(root, "tv_resnet18", "bgsis-k64-keep0.1", "train").tolist()) == expected_ids  # no duplicates: raw rows

    # The baseline came from the analysis's own images, all 12 of the split; a pass over the split, which
    # a split larger than the analysed images takes, gives the same accuracies.
    from overinterp.pipeline.driver import prepare
    from overinterp.pipeline.stream import StreamBackend

    parser = sis_imagenet.build_parser()
    cfg, source, plan, resources = prepare(RunConfig(**sis_imagenet.config_fields(parser, parser.parse_args(args))))
    backend = StreamBackend(cfg, plan, source, resources)
    test = backend.test_images()
    assert (len(test.labels), test.total) == (12, 12) and backend.baseline(test) is None
    fewer = dataclasses.replace(test, image_id=test.image_id[:5], images=test.images[:5], labels=test.labels[:5])
    assert backend.baseline(fewer) == summary["baseline"]


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "--train and --val are required"),
        (["--train", "/no/such", "--val", "/no/such"], "--train /no/such does not exist"),
        (["--train", ".", "--val", ".", "--model", "resnet20"], "--pretrained resnet20 has no named weights: give --weights FILE"),
        (["--train", ".", "--val", ".", "--fraction", "0"], "--fraction must be in (0, 1]"),
        (["--train", ".", "--val", ".", "--weights", "missing/w.pt"], "is not a file"),
        (["--train", ".", "--val", ".", "--max-hours", "-1"], "--max-hours must be >= 0 (0 turns the budget guard off)"),
    ],
)
def test_imagenet_bad_input(argv, match, capsys):
    assert sis_imagenet.main(argv) == 2
    assert match in capsys.readouterr().err


def test_cifar10_bad_input(capsys, tmp_path):
    assert sis_cifar10.main(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the smoke test writes its own CIFAR files: a --data-root given with it would be silently replaced
    assert sis_cifar10.main(["--smoke-test", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--smoke-test runs on CIFAR-10 files it writes itself: drop --data-root" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"not a torch file", "pickle"])
def test_imagenet_weights_that_are_not_a_state_dict_are_one_line(content, tmp_path, capsys):
    import pickle

    weights = tmp_path / "w.pt"
    if content == "pickle":  # a torch file whose pickle holds an arbitrary object: refused by weights_only, never run
        torch.save({"model": object.__new__(torch.nn.Module)}, weights, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    else:
        weights.write_bytes(content)
    write_imagefolder(str(tmp_path / "data"), n_per_class=2, num_classes=3, size=20)
    argv = ["--train", str(tmp_path / "data" / "train"), "--val", str(tmp_path / "data" / "val"), "--model", "tv:resnet18",
            "--weights", str(weights), "--out", str(tmp_path / "out")]
    assert sis_imagenet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--weights {weights}" in err and "state_dict" in err


def test_imagenet_smoke_settings_yield_to_flags_given(tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    parser = sis_imagenet.build_parser()
    smoke = sis_imagenet.config_fields(parser, parser.parse_args(["--smoke-test"]), str(tmp_path))
    given = sis_imagenet.config_fields(parser, parser.parse_args(["--smoke-test", "--epochs", "4", "--out", str(tmp_path)]), str(tmp_path))
    assert smoke["epochs"] == 1 and smoke["pretrained"] == "tv:resnet18" and smoke["weights"].startswith(str(tmp_path))
    assert smoke["out_dir"].startswith(str(tmp_path / "tmp" / "sis_imagenet-smoke-"))  # results in a folder of their own
    assert given["epochs"] == 4 and given["out_dir"] == str(tmp_path) and given["pretrained"] == "tv:resnet18"


def test_the_imagenet_smoke_inputs_are_removed_when_it_ends(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert sis_imagenet.main(["--smoke-test", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert [p for p in os.listdir(tmp_path) if p.startswith("sis_imagenet")] == []  # the data and the 43 MB of weights went with it
