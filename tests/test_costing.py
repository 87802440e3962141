"""The plan before the work: --dry-run on every kind of data set, the budget guard, --smoke's
stated pass bound. In-process through the session's local Ray."""

import os

import numpy as np
import pytest

from overinterp.cli import main
from overinterp.config import SMOKE_MAX_PASSES

pytestmark = pytest.mark.ray


def _no_work(out):
    assert not os.path.exists(out), os.listdir(out)  # nothing selected, trained, locked or logged


@pytest.mark.parametrize("kind", ["digits", "cifar10", "imagefolder"])
def test_dry_run_prints_the_plan_and_does_no_work(kind, ray_session, tmp_path, capsys):
    from overinterp.synthetic import write_cifar, write_imagefolder

    out = str(tmp_path / "out")
    argv = ["run", "--dry-run", "--out", out]
    if kind == "cifar10":
        write_cifar(str(tmp_path / "c"), n_train=20, n_test=10)
        argv += ["--dataset", "cifar10", "--data-root", str(tmp_path / "c"), "--models", "resnet20", "--max-hours", "0"]
    elif kind == "imagefolder":
        write_imagefolder(str(tmp_path / "f"), n_per_class=2, num_classes=2, size=20)
        argv += ["--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--image-size", "16", "--models", "resnet20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "resources (" in printed and "dry run: nothing selected" in printed
    hw = {"digits": 64, "cifar10": 1024, "imagefolder": 256}[kind]
    exact = f"{hw * (hw + 1) // 2:,} passes"  # exact backward selection per image
    assert f"backselect train" in printed and exact in printed and "total      ≈" in printed
    _no_work(out)


def test_budget_guard_refuses_exact_bs_on_224px_folders_before_any_work(ray_session, tmp_path, capsys):
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "f"), n_per_class=2, num_classes=2, size=40)
    out = str(tmp_path / "out")
    code = main(["run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--image-size", "224", "--selectors", "backselect",
                 "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "(> --max-hours 24): try --selector bgsis (≈" in err and "--image-size 32 (≈" in err and "--max-hours 0 turns this guard off" in err
    _no_work(out)


def test_smoke_on_a_folder_stays_within_the_stated_passes(ray_session, tmp_path, capsys):
    from overinterp import store
    from overinterp.cli import build_parser
    from overinterp.synthetic import write_imagefolder

    assert f"{SMOKE_MAX_PASSES:,} forward passes per image" in " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    write_imagefolder(str(tmp_path / "f"), n_per_class=3, num_classes=2, size=40)
    out = tmp_path / "out"
    assert main(["run", "--smoke", "--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--seeds", "0", "--input-dropout", "0",
                 "--fill", "mean", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = 0
    for model in os.listdir(out / "selections"):
        for tag in os.listdir(out / "selections" / model):
            if model == "none":
                continue
            sel = store.read_selections(str(out / "selections"), model, tag, "test")
            assert sel.forward_passes.max() <= SMOKE_MAX_PASSES, (tag, sel.forward_passes.max())
            assert sel.curve.shape[1] == 16 * 16  # the folder cut to the smoke's 16 px
            rows += len(sel.forward_passes)
    assert rows > 0 and "backselect-k8" in printed  # k raised from 1 to keep exact BS (32,896 passes at 16²) in bounds


def test_dry_run_on_an_out_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    """config.json records the settings an --out was made with: a dry run (or a real one) with other
    settings is refused in one line before data, Ray or calibration, and the file stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"dataset": "digits", "fraction": 0.5}')
    before = (out / "config.json").read_bytes()
    code = main(["run", "--dry-run", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "holds a run with other settings (" in err and "fraction" in err and "use a new --out directory" in err
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_bytes() == before
