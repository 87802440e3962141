"""The smoke run the fault-injection and multi-node tests compare with: one set of arguments, and
the reference run itself (`reference_run`, run once per session by the `smoke_reference` fixture).

Every disturbed run (a killed driver, worker or node, a signal, a full disk, a cluster instead of
one machine) must end with this run's summary.json and store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 seeds, no input-dropout variants, one selector and one fill: 2 full-image and 6 subset trials
ARGS = ["--smoke", "--seeds", "0,1", "--input-dropout", "0", "--select-batch", "8", "--selectors", "backselect", "--fill", "mean"]


def local_env() -> dict:
    """This process's environment without a Ray address: a run started with it embeds its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def summary(out: str) -> dict:
    s = json.load(open(os.path.join(out, "summary.json")))
    s.pop("mlflow_run_id", None)  # only in the returned summary, never in the file; kept off the comparison either way
    return s


def reference_run(out: str) -> dict:
    """`overinterp run ARGS --out out` on one machine, undisturbed: {"out", "summary"}."""
    p = subprocess.run([sys.executable, "-m", "overinterp.cli", "run", *ARGS, "--out", out], env=local_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {"out": out, "summary": summary(out)}
