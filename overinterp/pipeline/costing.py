"""The cost of a run before it starts: its Plan and resources turned into the rows of a CostPlan,
priced at rates measured on the device selection will use, then the budget guard.

The arithmetic, the guard and its faster alternatives live in overinterp/costplan.py (passes:
overinterp/selection/cost.py); this module measures the rates and ties the rows to the run's Plan,
config and resources: which settings (costplan.Knobs) the guard may offer for this run.

Rates. A GPU run's rates come from a Ray task holding what one selection actor holds (the driver
has no GPU on a cluster); a CPU run measures in the driver with the threads a worker gets.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import torch

from overinterp.costplan import (
    JOB_START_S,
    TRIAL_START_S,
    BudgetExceeded,
    CostPlan,
    Knobs,
    calibrate_forward_rate,
    calibrate_train_rate,
    check_budget,
    estimate_selection,
    estimate_training,
)
from overinterp.pipeline.plan import Plan
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


Rates = Union[float, Mapping[str, float]]  # one rate for every model, or one per model name


def _rate_of(rates: Rates, name: str, what: str) -> float:
    if isinstance(rates, Mapping):
        if name not in rates:
            raise ValueError(f"no {what} rate for model {name!r}: give one of {', '.join(map(repr, rates)) or 'none given'} for it")
        return rates[name]
    return rates


def plan_cost(
    plan: Plan,
    *,
    forward_rates: Rates,
    train_rates: Rates,
    select_workers: int,
    trial_concurrency: int,
    epochs: int,
    select_batch: Optional[int] = None,
    knobs: Knobs = Knobs(),
) -> CostPlan:
    """The cost of a run's Plan: one row per selection job with a pass formula, one per
    architecture and training stage.

    Args:
        forward_rates: one worker's forward images/s, per architecture name (a Plan's models, or a
            pretrained source's model name such as "tv:resnet50"), or one number for all. An
            ensemble of n checkpoints runs n forward passes per image: its rate is the member's / n.
        train_rates: one trial's training images/s, per architecture name, or one number.
        select_workers / trial_concurrency: ResourcePlan.select_workers / .trial_concurrency
            (streamed runs: ResourcePlan.streamed_trial_concurrency(workers_per_trial)).
        epochs: training epochs per trial; select_batch: images per selection call.
        knobs: the settings the budget guard may change for this run (`knobs_of`).
    """
    plan, _ = costable(plan)
    selections = []
    by_tag = {s.tag: (arch, s) for arch, variants in plan.sources.items() for s in variants.values()}
    for job in plan.selections:
        arch, source = by_tag.get(job.source.tag, (None, job.source))
        name = source.model["name"] if source.model else arch
        rate = _rate_of(forward_rates, name, "forward") / max(1, len(source.checkpoints))
        selections.append(estimate_selection(name, source.variant, job.selector, job.split, params=job.params,
                                             n_images=plan.n_images[job.split], hw=tuple(plan.shape[1:]), rate=rate,
                                             workers=select_workers, select_batch=select_batch, tag=job.tag,
                                             start_s=JOB_START_S))
    trainings = []
    for stage, specs in (("full-image", plan.full_trials), ("subsets", plan.subset_trials)):
        for arch in dict.fromkeys(t.model for t in specs):  # architectures in plan order
            mine = [t for t in specs if t.model == arch]
            on_selections = [t.subset for t in mine if t.subset and t.subset != plan.random_key]
            per_key = {k: on_selections.count(k) for k in on_selections}  # trials on each stored selection
            trainings.append(estimate_training(arch, stage, trials=len(mine), epochs=epochs, images=plan.n_images["train"],
                                               rate=_rate_of(train_rates, arch, "training"), concurrency=trial_concurrency,
                                               start_s=TRIAL_START_S, selections=len(per_key),
                                               per_selection=max(per_key.values(), default=0)))
    return CostPlan(tuple(selections), tuple(trainings), knobs)


def _accepts(cfg, **changes) -> bool:
    try:
        dataclasses.replace(cfg, **changes)
    except ValueError:  # ConfigError: the config's own checks
        return False
    return True


def knobs_of(cfg, plan: Plan, resources: ResourcePlan) -> Knobs:
    """The settings the budget guard may offer this run: --selector on `overinterp run` (unless
    --selector-options names a selector it would drop), --pixels-per-step and --max-workers on
    every run, --image-size on folders and streamed runs, --max-images on streamed runs."""
    selectors = tuple(cfg.selectors)
    sized = plan.streamed or cfg.dataset in ("imagefolder", "parquet")
    side = plan.shape[1]
    return Knobs(
        selectors=selectors if selectors and _accepts(cfg, selectors=("bgsis",)) else (),
        pixels_per_step=cfg.pixels_per_step, exact_tail=cfg.exact_tail,
        image_size=side if sized else None,
        min_image_size=next((s for s in range(1, side) if _accepts(cfg, image_size=s)), side) if sized else 1,
        max_workers=resources.select_workers,
        max_images=max(plan.n_images.values()) if plan.streamed else None,
    )


def plan_and_guard(cfg, plan: Plan, resources: ResourcePlan, enforce: bool = True, *,
                   trial_concurrency: Optional[int] = None) -> tuple[CostPlan, list[str]]:
    """Measure, cost the run, and refuse it (BudgetExceeded, one line with faster choices and their
    ETAs) when its ETA is over --max-hours. Returns the cost plan and notes to print; with
    enforce=False (--dry-run) the refusal becomes the last note instead.

    cfg: a resolved RunConfig or ImageNetConfig (epochs, batch_size, select_batch, pixels_per_step,
        exact_tail, max_hours; selectors for RunConfig).
    trial_concurrency: trials at once (default resources.trial_concurrency; streamed runs:
        resources.streamed_trial_concurrency(workers_per_trial)).
    """
    rates = measure_rates(plan, resources, cfg.batch_size)
    cost = plan_cost(plan, forward_rates={m: r[0] for m, r in rates.items()}, train_rates={m: r[1] for m, r in rates.items()},
                     select_workers=resources.select_workers, trial_concurrency=trial_concurrency or resources.trial_concurrency,
                     epochs=cfg.epochs, select_batch=cfg.select_batch, knobs=knobs_of(cfg, plan, resources))
    _, notes = costable(plan)
    try:
        check_budget(cost, cfg.max_hours)
    except BudgetExceeded as e:
        if enforce:
            raise
        notes.append(f"a real run would stop here: {e}")
    return cost, notes


__all__ = ["BudgetExceeded", "plan_and_guard", "plan_cost", "knobs_of", "measure_rates", "calibration_batch"]
