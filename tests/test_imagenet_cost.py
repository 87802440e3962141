"""jobs/sis_imagenet.py's plan before the work: --dry-run, the budget guard (--max-hours), and
--out left untouched by both. In-process through the session's local Ray, on a synthetic folder
and a local state_dict (as tests/test_jobs.py)."""

import os
import sys

import pytest
import torch

from overinterp.models import create_model
from overinterp.selection.cost import planned_forward_passes
from overinterp.synthetic import write_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))

import sis_imagenet  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture
def folder_args(tmp_path):
    """Arguments for a 3-class folder of 6 + 6 images at 32 px, explained by a local resnet18."""
    write_imagefolder(str(tmp_path / "data"), n_per_class=2, num_classes=3, size=40)
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=3).state_dict(), weights)
    return ["--train", str(tmp_path / "data" / "train"), "--val", str(tmp_path / "data" / "val"), "--model", "tv:resnet18",
            "--weights", str(weights), "--num-classes", "3", "--image-size", "32", "--pixels-per-step", "64", "--exact-tail", "0.05",
            "--epochs", "1", "--batch-size", "8", "--select-batch", "6", "--out", str(tmp_path / "out")]


def test_dry_run_prints_the_whole_plan_and_writes_nothing(ray_session, folder_args, tmp_path, capsys):
    assert sis_imagenet.main([*folder_args, "--dry-run", "--max-hours", "0"]) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "resources (" in printed and "cost (" in printed and "dry run: nothing selected" in printed
    passes = planned_forward_passes("bgsis", 32 * 32, 64, 0.05)
    for split in ("train", "test"):
        line = next(ln for ln in printed.splitlines() if "selection  tv:resnet18/pretrained bgsis-k64-keep0.1" in ln and f" {split}  " in ln)
        assert f"6 img × {passes:,} passes" in line and "≈" in line, line
    assert "training   tv:resnet18 subsets  3 trials × 1 epoch × 6 img" in printed
    assert "would stop here" not in printed  # --max-hours 0: no guard
    assert not (tmp_path / "out").exists()


def test_guard_refuses_in_one_line_naming_faster_choices_and_writes_nothing(ray_session, folder_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    assert sis_imagenet.main([*folder_args, "--max-hours", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sis_imagenet.py: error: the plan needs ≈ ") and "(> --max-hours 1e-06): try " in err
    assert any(f in err for f in ("--pixels-per-step 256 (≈", "--image-size 16 (≈", "--max-workers", "--max-images 3 (≈")), err
    assert sorted(os.listdir(out)) == ["keep.txt"]  # no lock, config.json, store or MLflow database


def test_dry_run_over_budget_notes_the_refusal_and_exits_0(ray_session, folder_args, tmp_path, capsys):
    assert sis_imagenet.main([*folder_args, "--dry-run", "--max-hours", "1e-6"]) == 0
    assert "a real run would stop here: the plan needs ≈ " in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
