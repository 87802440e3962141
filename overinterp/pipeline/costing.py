"""The cost of a run before it starts: its Plan and resources turned into the rows of a CostPlan,
priced at rates measured in the driver, then the budget guard.

The arithmetic, the guard and its faster alternatives live in overinterp/costplan.py (passes:
overinterp/selection/cost.py); this module measures the rates and ties the rows to the run's Plan,
config and resources: which settings (costplan.Knobs) the guard may offer for this run.

Rates. Nothing here runs a Ray task, so a dry run or a refused plan starts no node: the run's
models are calibrated on the driver's CPU (a CPU run: with the threads a worker gets) and a GPU
run's rates are those scaled by overinterp/device_rates.py. The printed plan says which, per model.

Resuming. A rerun on an --out prices only what is left: the rows already in the store (counted from
the shards' Parquet footers) and the trials already finished (their result.json) are left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from overinterp import fs, store
from overinterp.costplan import (
    JOB_START_S,
    STREAM_JOB_START_S,
    STREAM_RUN_S,
    RUN_S,
    STREAM_SELECT_CALL_S,
    STREAM_SELECT_IMAGE_S,
    STREAM_TRAIN_IMAGE_S,
    STREAM_DDP_TRIAL_START_S,
    STREAM_TRIAL_START_S,
    TRIAL_START_S,
    BudgetExceeded,
    CostPlan,
    Knobs,
    check_budget,
    estimate_explain,
    estimate_selection,
    estimate_training,
)
from overinterp.device_rates import REFERENCE_THREADS, measure, scaled
from overinterp.pipeline.plan import Plan
from overinterp.pipeline.resources import ResourcePlan
from overinterp.pipeline.terminal import log
from overinterp.pipeline.trial import result_path
from overinterp.selection import SELECTORS, is_model_selector


def _untrained(spec):
    from overinterp.models import ModelSpec, build, create_model

    if isinstance(spec, tuple):
        return build(ModelSpec(*spec))
    return create_model(**{**spec, "weights": None})  # weights do not change the speed


def measure_rates(plan: Plan, resources: ResourcePlan, train_batch: int) -> dict[str, tuple[float, float, str]]:
    """{model: (forward images/s of one selection worker, training images/s of one trial, where
    they came from)}: freshly built models timed on the driver's CPU, scaled to GPU workers and
    trials by the device-rates table. Runs no Ray task."""
    c = plan.shape[0]
    models = {m: (m, plan.num_classes, c) for m in plan.models}
    for variants in plan.sources.values():
        for s in variants.values():
            if s.model:
                models[s.model["name"]] = s.model
    threads = REFERENCE_THREADS if resources.use_gpu else resources.torch_threads()
    out = {}
    for name, spec in models.items():
        fwd, train = measure(_untrained(spec), plan.shape, plan.num_classes, "cpu", threads, train_batch)
        how = f"calibrated on the driver's CPU ({threads} thread{'s' if threads > 1 else ''})"
        if resources.use_gpu:
            fwd, gpu_train, how = scaled(name, resources.accelerator, fwd, train)
            if resources.gpus_per_trial:  # trials sharing a GPU share its rate
                train = gpu_train * min(1.0, resources.gpus_per_trial)
            else:
                how += "; training on CPUs: the driver's CPU rate"
        out[name] = (fwd, train, how)
    return out


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


@dataclass(frozen=True)
class Finished:
    """What earlier runs on this --out finished: rows stored per selection job and the trials with
    a result. A new --out has none."""

    stored: Mapping[tuple[str, str, str], int] = field(default_factory=dict)  # (source tag, selector tag, split) -> rows
    trials: frozenset = frozenset()  # names of finished trials

    @classmethod
    def of(cls, plan: Plan) -> "Finished":
        """Read from plan.out_dir: one footer read per stored shard, one existence check per trial."""
        keys = [(j.source.tag, j.tag, j.split) for j in plan.selections]
        rows = {k: store.stored_rows(plan.root, *k) for k in keys}
        names = [t.name for t in (*plan.full_trials, *plan.subset_trials)
                 if fs.exists(result_path(plan.out_dir, t))]
        return cls({k: n for k, n in rows.items() if n}, frozenset(names))

    def left(self, job, planned: int) -> int:
        """Images of a selection job not yet stored, of its `planned` ones."""
        return max(0, planned - self.stored.get((job.source.tag, job.tag, job.split), 0))

    def describe(self, plan: Plan) -> Optional[str]:
        """One line for the printed plan, or None when nothing is finished."""
        if not self.stored and not self.trials:
            return None
        planned = sum(plan.n_images[j.split] for j in plan.selections)
        stored = sum(min(n, plan.n_images[split]) for (_, _, split), n in self.stored.items())
        trials = len(plan.full_trials) + len(plan.subset_trials)
        return (f"resuming {plan.out_dir}: {stored:,} of {planned:,} selected images stored, {len(self.trials)} of {trials} "
                "trials finished; the ETA is for what is left")


def plan_cost(
    plan: Plan,
    *,
    forward_rates: Rates,
    train_rates: Rates,
    select_workers: int,
    trial_concurrency: int,
    epochs: int,
    select_batch: Optional[int] = None,
    workers_per_trial: int = 1,
    knobs: Knobs = Knobs(),
    finished: Finished = Finished(),
) -> CostPlan:
    """The cost of a run's Plan: one row per selection job with a pass formula, one per
    architecture and training stage.

    Args:
        forward_rates: one worker's forward images/s, per architecture name (a Plan's models, or a
            pretrained source's model name such as "tv:resnet50"), or one number for all. An
            ensemble of n checkpoints runs n forward passes per image: its rate is the member's / n.
        train_rates: one trial's training images/s, per architecture name, or one number.
        select_workers / trial_concurrency: ResourcePlan.select_workers / .trial_concurrency.
        epochs: training epochs per trial; select_batch: images per selection call.
        workers_per_trial: Train workers of a streamed trial (more than 1 starts a worker group).
        knobs: the settings the budget guard may change for this run (`knobs_of`).
        finished: what earlier runs on the --out finished, left out of the rows.
    """
    plan, _ = costable(plan)
    # a streamed run also pays, per image, for Ray Data's reading and decoding and, per trial, for its streams' start
    # (and a DDP trial for Ray Train's worker group)
    stream_trial_start = STREAM_TRIAL_START_S if workers_per_trial == 1 else STREAM_DDP_TRIAL_START_S
    job_start, select_image_s, trial_start, train_image_s = (
        (STREAM_JOB_START_S, STREAM_SELECT_IMAGE_S + STREAM_SELECT_CALL_S / (select_batch or 1), stream_trial_start, STREAM_TRAIN_IMAGE_S)
        if plan.streamed else (JOB_START_S, 0.0, TRIAL_START_S, 0.0))
    selections = []
    by_tag = {s.tag: (arch, s) for arch, variants in plan.sources.items() for s in variants.values()}
    for job in plan.selections:
        arch, source = by_tag.get(job.source.tag, (None, job.source))
        name = source.model["name"] if source.model else arch
        rate = _rate_of(forward_rates, name, "forward") / max(1, len(source.checkpoints))
        left = finished.left(job, plan.n_images[job.split])
        selections.append(estimate_selection(name, source.variant, job.selector, job.split, params=job.params,
                                             n_images=left, hw=tuple(plan.shape[1:]), rate=rate,
                                             workers=select_workers, select_batch=select_batch, tag=job.tag,
                                             image_s=select_image_s))
    trainings = []
    for stage, specs in (("full-image", plan.full_trials), ("subsets", plan.subset_trials)):
        for arch in dict.fromkeys(t.model for t in specs):  # architectures in plan order
            mine = [t for t in specs if t.model == arch and t.name not in finished.trials]
            if not mine:
                continue
            on_selections = [t.subset for t in mine if t.subset and t.subset != plan.random_key]
            per_key = {k: on_selections.count(k) for k in on_selections}  # trials on each stored selection
            trainings.append(estimate_training(arch, stage, trials=len(mine), epochs=epochs, images=plan.n_images["train"],
                                               rate=_rate_of(train_rates, arch, "training"), concurrency=trial_concurrency,
                                               start_s=trial_start, selections=len(per_key),
                                               per_selection=max(per_key.values(), default=0), image_s=train_image_s))
    # every job runs in one selection pass (select_stage): its actors start once
    return CostPlan(tuple(selections), tuple(trainings), knobs, fixed_s=STREAM_RUN_S if plan.streamed else RUN_S, select_start_s=job_start)


def explain_cost(cfg, plan: Plan) -> float:
    """Seconds of the explain stage (0 without --explain): its images from the questions and the
    pairs the plan trains, priced by costplan.estimate_explain."""
    if not cfg.explain:
        return 0.0
    from overinterp.explain import MAX_VCE_TARGETS
    from overinterp.explain.prior import PriorConfig
    from overinterp.pipeline.explain_stage import ExplainSettings, explain_models

    settings, models = ExplainSettings.of(cfg), explain_models(plan)
    n = min(settings.images, plan.n_images["test"])
    images = n * min(plan.num_classes - 1, MAX_VCE_TARGETS) * len(models.vce) if "vce" in settings.questions else 0
    if "disagree" in settings.questions:
        images += 2 * settings.images * len(models.pairs)
    c, h, w = plan.shape
    return estimate_explain(pixels=c * h * w, prior_steps=0 if settings.generator else settings.prior_steps,
                            prior_batch=min(PriorConfig.batch_size, plan.n_images["train"]), images=images, method=settings.method,
                            steps=settings.guidance_steps, iterations=settings.iterations)


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
        pixels_per_step=cfg.pixels_per_step, exact_tail=cfg.exact_tail, keep_fraction=cfg.fraction,
        image_size=side if sized else None,
        min_image_size=next((s for s in range(1, side) if _accepts(cfg, image_size=s)), side) if sized else 1,
        max_workers=resources.select_workers, worker_slots=resources.worker_slots,
        max_images=max(plan.n_images.values()) if plan.streamed else None,
    )


def plan_and_guard(cfg, plan: Plan, resources: ResourcePlan, enforce: bool = True) -> tuple[CostPlan, str]:
    """Measure (in the driver), cost the run, print the cost plan, and refuse the run
    (BudgetExceeded, one line with faster choices and their ETAs) when its ETA is over --max-hours.
    Returns the cost plan and its printed text; with enforce=False (--dry-run) the refusal becomes
    the text's last note instead.

    cfg: a resolved RunConfig (epochs, batch_size, select_batch, pixels_per_step,
        exact_tail, max_hours; selectors for RunConfig).
    """
    rates = measure_rates(plan, resources, cfg.batch_size)
    finished = Finished.of(plan)
    cost = plan_cost(plan, forward_rates={m: r[0] for m, r in rates.items()}, train_rates={m: r[1] for m, r in rates.items()},
                     select_workers=resources.select_workers, trial_concurrency=resources.trial_concurrency,
                     epochs=cfg.epochs, select_batch=cfg.selection_batch(plan.streamed), workers_per_trial=cfg.workers_per_trial,
                     knobs=knobs_of(cfg, plan, resources),
                     finished=finished)
    cost = dataclasses.replace(cost, rate_sources=tuple((m, r[2]) for m, r in rates.items()), explain_s=explain_cost(cfg, plan))
    _, notes = costable(plan)
    resuming = finished.describe(plan)
    if resuming:
        notes.insert(0, resuming)
    refusal = None
    try:
        check_budget(cost, cfg.max_hours)
    except BudgetExceeded as e:
        refusal = e
        if not enforce:
            notes.append(f"a real run would stop here: {e}")
    text = cost.describe() + "".join(f"\n  note: {n}" for n in notes)
    log(text)  # a refused plan is printed too: the error line alone does not say where its rates came from
    if refusal is not None and enforce:
        raise refusal
    return cost, text


__all__ = ["BudgetExceeded", "Finished", "plan_and_guard", "plan_cost", "knobs_of", "measure_rates"]
