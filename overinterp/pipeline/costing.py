"""The cost of a run before it starts: forward passes per selection job, an ETA from a short
calibration on the device selection will use, the budget guard, and progress against the plan.

The arithmetic lives in overinterp/costplan.py (passes: overinterp/selection/cost.py); this module
measures the rates and ties the plan to the run's config and resources.

Rates. A GPU run's rates come from a Ray task holding what one selection actor holds (the driver
has no GPU on a cluster); a CPU run measures in the driver with the threads a worker gets. The rate
at another --image-size (for the guard's alternatives) is scaled by the pixel count — forward cost
grows about linearly with it for convolutional nets — rather than measured again.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from overinterp.costplan import BudgetExceeded, CostPlan, alternatives_for, calibrate_forward_rate, calibrate_train_rate, check_budget, plan_cost
from overinterp.pipeline.plan import Plan, make_plan
from overinterp.pipeline.resources import ResourcePlan
from overinterp.selection import SELECTORS, is_model_selector

CALIBRATION_SECONDS = 0.5  # per model and kind of pass: the whole calibration stays within seconds


def calibration_batch(hw: int) -> int:
    """Images per timed pass: about what the engine's chunks hold (many small images, few large)."""
    return max(2, min(256, 65536 // hw))


def _measure(models: dict, shape, num_classes: int, batch: int, train_batch: int, threads: int, device: Optional[str] = None) -> dict:
    """{arch: (forward images/s, training images/s)} of freshly built (untrained) models."""
    from overinterp.models import ModelSpec, build

    torch.set_num_threads(max(1, threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    for arch, spec in models.items():
        model = build(ModelSpec(*spec)) if isinstance(spec, tuple) else _pretrained_shape(spec)
        fwd = calibrate_forward_rate(model, shape, dev, batch, seconds=CALIBRATION_SECONDS, channels_last=dev.type == "cuda")
        train = calibrate_train_rate(model, shape, num_classes, dev, train_batch, seconds=CALIBRATION_SECONDS)
        out[arch] = (fwd, train)
    return out


def _pretrained_shape(spec: dict):
    from overinterp.models import create_model

    return create_model(spec["name"], num_classes=spec["num_classes"], weights=None)  # weights do not change the speed


def measure_rates(plan: Plan, resources: ResourcePlan, train_batch: int) -> dict:
    """{arch: (forward, training) images/s} on the device one selection worker has."""
    c = plan.shape[0]
    models = {m: (m, plan.num_classes, c) for m in plan.models}
    for variants in plan.sources.values():
        for s in variants.values():
            if s.model:
                models[s.model["name"]] = s.model
    batch = calibration_batch(plan.hw)
    args = (models, plan.shape, plan.num_classes, batch, min(train_batch, batch), resources.torch_threads())  # small at 224 px: seconds
    if not resources.use_gpu:
        threads = torch.get_num_threads()
        try:
            return _measure(*args, device="cpu")
        finally:
            torch.set_num_threads(threads)
    import ray

    task = ray.remote(_measure).options(**resources.worker_request())
    return ray.get(task.remote(*args))


def costable(plan: Plan) -> tuple[Plan, list[str]]:
    """The plan without the selections whose cost has no formula (captum:<Class>), and notes."""
    keep = tuple(j for j in plan.selections if j.selector in SELECTORS)
    skipped = sorted({j.selector for j in plan.selections if j not in keep and is_model_selector(j.selector)})
    notes = [f"{s}: no pass formula, not in the ETA (time a few images to know)" for s in skipped]
    return dataclasses.replace(plan, selections=keep), notes


def cost_of(plan: Plan, rates: dict, resources: ResourcePlan, epochs: int, select_batch: int,
            select_workers: Optional[int] = None, trial_concurrency: Optional[int] = None) -> CostPlan:
    plan, _ = costable(plan)
    return plan_cost(plan, forward_rates={m: r[0] for m, r in rates.items()}, train_rates={m: r[1] for m, r in rates.items()},
                     select_workers=select_workers or resources.select_workers,
                     trial_concurrency=trial_concurrency or resources.trial_concurrency, epochs=epochs, select_batch=select_batch)


def replan_small(cfg, plan: Plan, shape: tuple, n_images: dict) -> Plan:
    """`overinterp run`'s plan with other settings, images of `shape` and `n_images` per split."""
    return make_plan(cfg, shape, n_images, plan.num_classes)


def plan_and_guard(cfg, plan: Plan, resources: ResourcePlan, enforce: bool = True, *, replan: Callable = replan_small,
                   trial_concurrency: Optional[int] = None) -> tuple[CostPlan, list[str]]:
    """Measure, cost the run, and refuse it (BudgetExceeded, one line with faster choices and their
    ETAs) when its ETA is over --max-hours. Returns the cost plan and notes to print; with
    enforce=False (--dry-run) the refusal becomes the last note instead.

    cfg: a resolved RunConfig (epochs, batch_size, select_batch, pixels_per_step,
        max_hours; selectors for RunConfig).
    replan: (cfg with the alternative's settings, this plan, shape, n_images) -> its Plan.
    trial_concurrency: trials at once (default resources.trial_concurrency; streamed runs:
        resources.streamed_trial_concurrency(workers_per_trial)).
    """
    rates = measure_rates(plan, resources, cfg.batch_size)
    cost = cost_of(plan, rates, resources, cfg.epochs, cfg.select_batch, trial_concurrency=trial_concurrency)
    _, notes = costable(plan)
    if cfg.max_hours and cost.eta_seconds > cfg.max_hours * 3600:
        def reestimate(overrides: dict) -> Optional[CostPlan]:
            changes, scaled, workers, n_images = {}, rates, None, plan.n_images
            if "selector" in overrides:
                changes["selectors"] = (overrides["selector"],)
            if "pixels_per_step" in overrides:
                changes["pixels_per_step"] = overrides["pixels_per_step"]
            shape = plan.shape
            if "image_size" in overrides:
                s = overrides["image_size"]
                shape = (plan.shape[0], s, s)
                factor = plan.hw / (s * s)
                scaled = {m: (f * factor, t * factor) for m, (f, t) in rates.items()}
            if "max_workers" in overrides:
                workers = overrides["max_workers"]
            if "max_images" in overrides:
                n_images = {s: min(n, overrides["max_images"]) for s, n in plan.n_images.items()}
            try:
                new_cfg = dataclasses.replace(cfg, **changes)
            except ValueError:
                return None
            return cost_of(replan(new_cfg, plan, shape, n_images), scaled, resources, cfg.epochs, cfg.select_batch, workers,
                           trial_concurrency)

        current = {"pixels_per_step": cfg.pixels_per_step, "max_workers": resources.select_workers}
        if hasattr(cfg, "selectors"):
            current["selector"] = cfg.selectors[0] if len(cfg.selectors) == 1 else "several"
        if plan.streamed or getattr(cfg, "dataset", None) in ("imagefolder", "parquet"):
            current["image_size"] = plan.shape[1]
        if plan.streamed:
            current["max_images"] = max(plan.n_images.values())
        try:
            check_budget(cost, cfg.max_hours, alternatives_for(reestimate, current))
        except BudgetExceeded as e:
            if enforce:
                raise
            notes.append(f"a real run would stop here: {e}")
    return cost, notes


__all__ = ["BudgetExceeded", "plan_and_guard", "measure_rates", "cost_of", "calibration_batch"]
