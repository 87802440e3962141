"""What `overinterp run` prints on a clean machine: our stage lines and progress, no Ray INFO line,
no `E` log line (the actor-constructor warning of ray-project/ray#53727 included), no warnings."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_smoke_run_prints_no_ray_chatter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    p = subprocess.run([sys.executable, "-m", "overinterp.cli", "run", "--smoke", "--seeds", "0", "--input-dropout", "0",
                        "--selectors", "backselect,gradient", "--fill", "mean", "--out", str(tmp_path / "out")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    printed = p.stdout + p.stderr
    assert p.returncode == 0, printed[-3000:]
    lines = printed.splitlines()
    assert not [l for l in lines if re.search(r"\bINFO\b", l)], "Ray/MLflow INFO lines"
    assert not [l for l in lines if re.match(r"^\[\d{4}-\d\d-\d\d [\d:,]+ E \d+", l) or "core_worker.cc" in l], "E log lines"
    assert not [l for l in lines if "Warning" in l or " WARNING " in l], "warnings"
    assert sum("stage " in l and "/4: " in l for l in lines) == 4  # one line per stage start
    assert any(l.startswith("selection backselect digits_cnn-s0/train: ") and "passes" in l for l in lines)  # progress
    assert any(l.startswith("training (subsets): ") for l in lines)
