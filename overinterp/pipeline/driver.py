"""The one driver both pipelines share: it walks a Plan stage by stage.

A backend supplies the data-specific steps: `run.InMemoryBackend` (digits, CIFAR, small folders:
images in memory, Tune trials) and `imagenet.StreamBackend` (ImageNet-style sources streamed
through Ray Data, Ray Train trials). Everything else — stage order, what is skipped on a rerun, the
summary's shape, reports and tracking — lives here once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Optional, Protocol

from overinterp import fs
from overinterp.pipeline.plan import SPLITS, Plan, SelectionJob
from overinterp.pipeline.trial import TrialSpec


def log(msg: str) -> None:
    print(f"[overinterp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Backend(Protocol):
    def train_full(self, specs: list[TrialSpec]) -> dict[str, dict]: ...
    def baseline(self) -> dict: ...  # a pretrained explained model's accuracy (streamed runs)
    def select(self, job: SelectionJob) -> None: ...
    def write_random(self, split: str) -> None: ...
    def train_subsets(self, specs: list[TrialSpec]) -> dict[str, dict]: ...
    def summarize(self, full: dict, subsets: dict, baseline: dict) -> dict: ...
    def reports(self, summary: dict, local_dir: str) -> list[str]: ...
    def dataset_input(self) -> dict: ...  # {name, source, digest[, images, labels]} for MLflow's dataset input
    def models_to_log(self) -> dict: ...  # {trial name: (model, example input)} of the full-image models


class Stages:
    """Numbered stage lines: one at the start and one at the end of each."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def run(self, title: str, fn, *args):
        self.n += 1
        log(f"stage {self.n}/{self.total}: {title}")
        t0 = time.time()
        out = fn(*args)
        log(f"stage {self.n}/{self.total} done in {time.time() - t0:.0f} s")
        return out


def run_job(cfg, plan: Plan, resources, make_backend: Callable, *, holder: str, dataset: str, t0: float,
            dry_run: bool = False, **guard) -> Optional[dict]:
    """What both entry points do once their plan and resources are known: print them with the cost
    plan (refused over --max-hours, before anything is written), stop there for --dry-run (None),
    else hold the --out lock, record the settings, and walk the plan under an MLflow parent.

    make_backend(callbacks, cost) -> the Backend; holder: the lock holder's name ("overinterp run");
    dataset: the parent's data-set name; t0: when the job started; guard: plan_and_guard's options.
    """
    from overinterp.config import check_reuse
    from overinterp.costplan import format_duration
    from overinterp.pipeline.costing import plan_and_guard
    from overinterp.pipeline.lock import OutputLock

    cost, notes = plan_and_guard(cfg, plan, resources, enforce=not dry_run, **guard)
    cost_text = cost.describe() + "".join(f"\n  note: {n}" for n in notes)
    log(cost_text)
    if dry_run:
        log("dry run: nothing selected, trained or written")
        return None
    with OutputLock(cfg.out_dir, holder) as lock:
        check_reuse(cfg, fs.join(cfg.out_dir, "config.json"))
        from overinterp.pipeline.tracking import Tracker  # MLflow only where tracking happens

        with Tracker(cfg, dataset, resources, previous_holder=lock.taken_over) as tracker:
            tracker.log_plan("\n".join([plan.describe(), resources.describe(), cost_text]), cost)
            summary = run_plan(plan, make_backend([tracker.trial_logger()], cost), tracker)
    log(f"done in {time.time() - t0:.0f} s (planned {format_duration(cost.eta_seconds)})")
    return summary


def accuracy_by_condition(plan: Plan, full: dict, subsets: dict) -> dict:
    """{model: {condition: [accuracy per seed, in plan.seeds order]}}."""
    out = {}
    for spec in list(plan.full_trials) + list(plan.subset_trials):
        result = (full if spec in plan.full_trials else subsets)[spec.name]
        out.setdefault(spec.model, {}).setdefault(spec.condition, {})[spec.seed] = result["accuracy"]
    return {m: {c: [v[s] for s in plan.seeds if s in v] for c, v in conds.items()} for m, conds in out.items()}


def run_plan(plan: Plan, backend: Backend, tracker=None) -> dict:
    """Walk the plan; returns the summary (also in <out>/summary.json)."""
    if tracker is not None:
        tracker.log_data(backend.dataset_input())
    stages = Stages(4 if plan.full_trials else 3)
    full, baseline = {}, {}
    if plan.full_trials:
        full = stages.run(f"training {len(plan.full_trials)} full-image models", backend.train_full, list(plan.full_trials))

    def select_all():
        for job in plan.selections:
            backend.select(job)
        for split in SPLITS:
            backend.write_random(split)

    stages.run(f"selection ({', '.join(sorted({j.tag for j in plan.selections}))}) and the random baseline", select_all)
    subsets = stages.run(f"training {len(plan.subset_trials)} models on {100 * plan.fraction:g}% pixel-subsets",
                         backend.train_subsets, list(plan.subset_trials))

    def compare():
        summary = backend.summarize(full, subsets, baseline)  # a pretrained model's baseline is measured here
        local = tempfile.mkdtemp(prefix="overinterp-report-")
        reports = backend.reports(summary, local)  # first: it lists its plots in the summary, which summary.md embeds
        files = write_summary(plan, summary, local) + reports
        if tracker is not None:
            tracker.log_results(plan, full, subsets, summary, files, backend.models_to_log())
            summary["mlflow_run_id"] = tracker.run_id
        return summary

    return stages.run("summary", compare)


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


def masks_from_store(plan: Plan, keys: list[str], n: dict, expect: Optional[dict] = None) -> dict:
    """{subset key: {split: (N, HW) bool keep-mask}} read back from the store, validated complete."""
    from overinterp import store
    from overinterp.selection import keep_mask

    masks = {}
    for key in keys:
        model_tag, sel_tag = key.split("/")
        masks[key] = {}
        for split in SPLITS:
            ids = None if expect is None else expect[split]
            sel = store.read_selections(plan.root, model_tag, sel_tag, split, expect_n=None if ids is not None else n[split], expect_ids=ids)
            masks[key][split] = keep_mask(sel.order, plan.fraction).numpy()
    return masks
