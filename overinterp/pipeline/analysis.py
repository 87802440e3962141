"""What every run reports, whatever its backend: accuracies by condition, summary.json and
summary.md, and the copies of report files in --out.
"""

from __future__ import annotations

import json
import os

from overinterp import fs
from overinterp.pipeline.plan import Plan


def accuracy_by_condition(plan: Plan, full: dict, subsets: dict) -> dict:
    """{model: {condition: [accuracy per seed, in plan.seeds order]}}."""
    out = {}
    for spec in list(plan.full_trials) + list(plan.subset_trials):
        result = (full if spec in plan.full_trials else subsets)[spec.name]
        out.setdefault(spec.model, {}).setdefault(spec.condition, {})[spec.seed] = result["accuracy"]
    return {m: {c: [v[s] for s in plan.seeds if s in v] for c, v in conds.items()} for m, conds in out.items()}


def write_summary(plan: Plan, summary: dict, local_dir: str) -> list[str]:
    """summary.json and summary.md into out_dir (path or URI); returns local copies for MLflow."""
    from overinterp.report import summary_markdown

    paths = []
    for name, text in (("summary.json", json.dumps(summary, indent=1, sort_keys=True)), ("summary.md", summary_markdown(summary))):
        path = os.path.join(local_dir, name)
        with open(path, "w") as f:
            f.write(text)
        fs.write_text(fs.join(plan.out_dir, name), text)
        paths.append(path)
    return paths


def copy_out(paths: list[str], out_dir: str) -> None:
    for p in paths:
        with open(p, "rb") as f:
            fs.write_bytes(fs.join(out_dir, os.path.basename(p)), f.read())
