"""Know the cost before paying for it: rates, an ETA for every stage, and the budget guard.

    calibrate_forward_rate / calibrate_train_rate   images/s of the real model on the device
    estimate_selection / estimate_training           passes (selection/cost.py) × rates -> one row's ETA
    CostPlan                                         a run's rows, in the order they run, and its Knobs
    reprice + alternatives_for                       the same rows under other settings (k, selector, ...)
    check_budget                                     refuse a plan over --max-hours, naming faster ones

Everything but the calibration is arithmetic, so the tests check the ETAs exactly. Each row keeps
what it was priced from, so the guard prices a faster setting from the CostPlan alone. The pipeline
builds the rows from its Plan and rates measured in the driver (pipeline/costing.py, scaled to other
devices by device_rates.py; the CostPlan prints where each came from); nothing here imports Ray,
MLflow or the pipeline: `CostPlan.as_params()` is a flat dict the pipeline logs.

The ETA model: a stage's images are spread over its workers in select batches (or its trials over
the trials that run at once), so the busiest worker's share, not the average, sets the wall time;
the stages run one after the other (pipeline/driver.py), so their ETAs add up. Left out: loading
and compiling models, the chunk autotuner, evaluation after training (one forward pass over the
test split per trial), the random baseline and the summary — seconds next to what is counted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from overinterp.models import device_of
from overinterp.selection import REMOVAL_SELECTORS, selector_params, selector_tag
from overinterp.selection.cost import planned_passes
from overinterp.selection.engine import sync
from overinterp.training import TrainConfig, sgd

# A backward pass costs about two forward passes: it multiplies by each weight's transpose to get
# the input gradient and again to get the weight gradient (the usual 3× forward for a training
# step, Kaplan et al. 2020). Only the ETA uses it; the pass counts stay separate.
BACKWARD_COST = 2.0
# Fixed costs beside the passes (a run's selection pass, which serves all of its jobs; a training trial), measured on the 2-core
# machine of BENCHMARKS.md (digits smoke run: ~10 s from a selection pass's submission to its first batch — Ray Data planning and
# actor start, model load; ~1 s per trial for Tune's scheduling, the data hand-over and evaluation). They dominate
# small runs and vanish in large ones.
JOB_START_S = 10.0
TRIAL_START_S = 1.0
# and once per in-memory run: Ray's start (~5 s), each training stage's Tune start (~6 s: the trial
# process imports torch and Ray) and the summary (~4 s), measured on the same machine: the smoke
# run of tests/smoke_reference.py took 40–43 s against 17–18 s of its jobs' and trials' rows.
RUN_S = 20.0
# A streamed run's costs beside the model's passes, fitted to the stage times of benchmarks/driver_rss.py
# on 2-core VMs (ImageNet-shaped Parquet, 8-px images, N = 10,000 to 1,331,167; BENCHMARKS.md):
# per image, Ray Data reading and decoding it for a selection actor, and per selection call its
# hand-off and its store shard's write (seconds of one worker; at 32 and 512 images a call), or
# streaming, joining and decoding it for a training trial (seconds of one trial); per trial, Tune
# scheduling it, its streams' start, the keep-mask table, the trial's validation and epoch state (a
# one-worker trial trains in its own process), and for a DDP trial (--workers-per-trial > 1) Ray
# Train starting its controller and worker group too. Machine-bound constants: a cluster with
# faster CPUs streams faster, and the re-plan printed once selection runs (select_stage) measures
# the real rate.
STREAM_JOB_START_S = 8.0
STREAM_SELECT_IMAGE_S = 1.9e-4
STREAM_SELECT_CALL_S = 1.47e-2
STREAM_TRIAL_START_S = 7.0
STREAM_DDP_TRIAL_START_S = 20.0
STREAM_TRAIN_IMAGE_S = 1.6e-4  # between the two VMs of BENCHMARKS.md's ImageNet-count runs: 1.1e-4 and 2.0e-4
# and once per run: Ray's start (9–12 s) and the summary stage (the explained model's evaluation over
# the validation images, test images decoded for the analysis, the plots, MLflow: 3–8 s at 100–1,000
# validation images, 19–25 s at 50,000). One constant, so that the guard's alternatives keep it.
STREAM_RUN_S = 15.0
# The explain stage (guided generation, pipeline/explain_stage.py) on the same 2-core machine with
# both cores: the diffusion prior costs PRIOR_PIXEL_S per image-pixel of each training step's batch
# (0.17 s a step of 128 8×8 digits; fitted to the default digits run with --explain); a guided chain step costs GUIDED_STEP_S per batch (the UNet's
# fixed cost at tiny batches) plus GUIDED_PIXEL_S per image-pixel ("noise" runs iterations + 1
# chains, "universal" one). CPU constants: a GPU runs the stage far faster than they say.
PRIOR_PIXEL_S = 2.1e-5
GUIDED_STEP_S = 2.0e-2
GUIDED_PIXEL_S = 2.0e-5
EXPLAIN_START_S = 10.0  # the task's start, model loads, Parquet and galleries


# ---------------------------------------------------------------------------------------------
# Durations


def format_duration(seconds: float) -> str:
    """Human-readable duration: '< 1 s', '42 s', '1 min 12 s', '5 h 3 min', '19 h', '3.5 days',
    '3.2 years', '∞'. Precision falls with size: no one plans a 3-year run to the minute."""
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"a duration must be >= 0 seconds, got {seconds!r}")
    if math.isinf(seconds):
        return "∞"
    if seconds < 1:
        return "< 1 s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    hours = seconds / 3600
    if hours < 10:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    if hours < 48:
        return f"{round(hours)} h"
    days = hours / 24
    if days < 365:
        return f"{days:.1f} days" if days < 10 else f"{round(days)} days"
    years = days / 365.25
    return f"{years:.1f} years" if years < 100 else f"{round(years):,} years"


def format_rate(x: float) -> str:
    """'12,000' at 100 and above, three significant digits below ('2.5', '0.0417')."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# Calibration: images per second of the real model on the device


def _autocast(autocast: Optional[str], device: torch.device):
    if autocast is None:
        return contextlib.nullcontext()
    if autocast not in ("bf16", "fp16"):
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
    if device.type != "cuda":
        raise ValueError("autocast (bf16/fp16) is supported on CUDA only; drop it on CPU")
    return torch.autocast("cuda", dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)


def _time_calls(step: Callable[[], object], device: torch.device, seconds: float, warmup: int = 2, min_calls: int = 3) -> float:
    """Seconds per call of `step`, averaged over calls until `seconds` have passed (at least
    `min_calls`), after `warmup` untimed calls (cuDNN autotuning, allocator, lazy init)."""
    for _ in range(warmup):
        step()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        if calls >= min_calls:
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return elapsed / calls


def _check_calibration(shape, batch: int, seconds: float) -> None:
    if len(tuple(shape)) != 3 or any(int(v) < 1 for v in shape):
        raise ValueError(f"shape must be (C, H, W) of positive sizes, got {shape!r}")
    _positive("batch", batch)  # images per forward pass
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")


def calibrate_forward_rate(
    model: Callable[[torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    device: Union[str, torch.device],
    batch: int,
    *,
    autocast: Optional[str] = None,
    channels_last: bool = True,
    seconds: float = 1.0,
) -> float:
    """Images per second of batched inference, as selection runs it (selection/backselect.Scorer).

    Args:
        model: an nn.Module (timed on a copy in eval mode, so the caller's model keeps its memory
            format and its BatchNorm statistics; the copy holds a second set of weights on the
            device while it runs) or any (N, C, H, W) -> logits callable.
        shape: (C, H, W) of one image; the inputs are random normalised images.
        device: where to time it (the selection workers' kind of device).
        batch: images per forward pass — the selection's chunk (EngineConfig.chunk, or what the
            autotuner picks: the largest that fits on GPUs).
        autocast: None (fp32), "bf16" or "fp16" (CUDA only), as EngineConfig.autocast.
        channels_last: NHWC inputs and weights, as EngineConfig.channels_last.
        seconds: how long to time, after a warm-up of two calls.
    Returns:
        images / second (softmax included); > 0.
    """
    _check_calibration(shape, batch, seconds)
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(model, nn.Module):
        model = copy.deepcopy(model).to(device=device, memory_format=fmt).eval()
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device).contiguous(memory_format=fmt)

    def step():
        with torch.inference_mode(), _autocast(autocast, device):
            return torch.softmax(model(x).float(), 1)

    return batch / _time_calls(step, device, seconds)


def calibrate_train_rate(
    model: nn.Module,
    shape: Sequence[int],
    num_classes: int,
    device: Union[str, torch.device],
    batch: int,
    *,
    seconds: float = 1.0,
) -> float:
    """Images per second of training steps (forward, cross-entropy, backward, SGD with Nesterov
    momentum, as training.train_model) on random images and labels.

    The model trains in place (moved to `device` for it, then back) and gets back exactly what it
    had: its state_dict (weights and BatchNorm statistics), its .grad tensors, its train/eval mode
    and torch's global RNG (dropout draws from it).

    Returns:
        images / second; > 0.
    """
    _check_calibration(shape, batch, seconds)
    _positive("num_classes", num_classes, low=2)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    home = device_of(model)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    was_training = model.training
    model.to(device)  # in place: the same Parameter objects, moved back below
    opt, _ = sgd(model, TrainConfig())  # training's recipe; the schedule does not change a step's time

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            per_call = _time_calls(step, device, seconds)
    finally:
        model.to(home)
        with torch.no_grad():
            model.load_state_dict(saved)
        for p, g in grads:
            p.grad = g
        model.train(was_training)
    return batch / per_call


# ---------------------------------------------------------------------------------------------
# Costs: one row per selection job and per training stage, each able to price itself again


@dataclass(frozen=True)
class SelectionCost:
    """One selection job (source model × selector × split): passes and wall time.

    Besides the result it keeps what it was priced from (selector, params, images, size, rate,
    workers offered, select batch, start-up), so `repriced` prices the same job under other settings.
    """

    model: str  # the explained model's architecture, e.g. digits_cnn, tv:resnet50
    variant: str  # plain | ensemble | input-dropout | pretrained
    selector: str  # the selector's name, e.g. backselect, bgsis, ig
    params: Mapping = field(hash=False)  # its parameters as a SelectionJob holds them: {"k": 100} for bgsis-k100
    tag: str  # the selector's store tag, e.g. backselect, bgsis-k100
    split: str
    n_images: int
    size: Union[int, tuple[int, int]]  # H·W, or (H, W)
    forward_per_image: int  # selection/cost.py: planned passes of one image
    backward_per_image: int
    max_workers: int  # selection actors offered to the job
    workers: int  # selection actors the job runs on (at most one per select batch)
    select_batch: Optional[int]  # images per actor call; None: images spread evenly
    rate: float  # forward passes (images) per second of one worker
    start_s: float  # the job's fixed start-up, seconds
    eta_seconds: float
    image_s: float = 0.0  # seconds of one worker per image beside its passes (streamed runs: STREAM_SELECT_IMAGE_S)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.variant} {self.tag} {self.split}"

    @property
    def forward_passes(self) -> int:
        return self.n_images * self.forward_per_image

    @property
    def backward_passes(self) -> int:
        return self.n_images * self.backward_per_image

    def repriced(self, **changes) -> "SelectionCost":
        """This job with some of `estimate_selection`'s arguments changed (the tag follows the
        selector and its params)."""
        args = dict(model=self.model, variant=self.variant, selector=self.selector, split=self.split, params=self.params,
                    n_images=self.n_images, hw=self.size, rate=self.rate, workers=self.max_workers,
                    select_batch=self.select_batch, start_s=self.start_s, image_s=self.image_s)
        args.update(changes)
        retag = "selector" in changes or "params" in changes
        return estimate_selection(**args, tag=selector_tag(args["selector"], dict(args["params"])) if retag else self.tag)

    def describe(self) -> str:
        per = f"{self.forward_per_image:,} passes" + (f" + {self.backward_per_image:,} backward" if self.backward_per_image else "")
        total = f"{self.forward_passes:,} passes" + (f" + {self.backward_passes:,} backward" if self.backward_per_image else "")
        stream = f" + {1e3 * self.image_s:.2g} ms/img streaming" if self.image_s else ""
        return (f"selection  {self.label}  {self.n_images:,} img × {per} = {total}  ≈ {format_duration(self.eta_seconds)} "
                f"on {self.workers} worker{'s' if self.workers != 1 else ''} at {format_rate(self.rate)} img/s each{stream}")


@dataclass(frozen=True)
class TrainingCost:
    """The trials of one architecture in one training stage."""

    model: str  # architecture trained, e.g. digits_cnn
    stage: str  # "full-image" | "subsets"
    trials: int
    epochs: int
    images: int  # training images per epoch of one trial
    max_concurrency: int  # trials the stage may run at once
    concurrency: int  # trials at once
    rate: float  # training images per second of one trial
    start_s: float  # each trial's fixed start-up, seconds
    # The subsets stage trains on each selector's stored subsets: `selections` of them, `per_selection`
    # trials each (seeds × fills and positions), so a run with fewer selectors has fewer trials.
    selections: int
    per_selection: int
    eta_seconds: float
    image_s: float = 0.0  # seconds of one trial per training image beside the model (streamed runs: STREAM_TRAIN_IMAGE_S)

    @property
    def label(self) -> str:
        return f"{self.model} {self.stage}"

    @property
    def total_images(self) -> int:
        return self.trials * self.epochs * self.images

    def repriced(self, **changes) -> "TrainingCost":
        """These trials with some of `estimate_training`'s arguments changed."""
        args = dict(trials=self.trials, epochs=self.epochs, images=self.images, rate=self.rate, concurrency=self.max_concurrency,
                    start_s=self.start_s, selections=self.selections, per_selection=self.per_selection, image_s=self.image_s)
        args.update(changes)
        return estimate_training(self.model, self.stage, **args)

    def describe(self) -> str:
        stream = f" + {1e3 * self.image_s:.2g} ms/img streaming, {self.start_s:g} s start per trial" if self.image_s else ""
        return (f"training   {self.label}  {self.trials} trial{'s' if self.trials != 1 else ''} × {self.epochs} epoch{'s' if self.epochs != 1 else ''} × "
                f"{self.images:,} img = {self.total_images:,} images  ≈ {format_duration(self.eta_seconds)} "
                f"on {self.concurrency} at once at {format_rate(self.rate)} img/s each{stream}")


@dataclass(frozen=True)
class Knobs:
    """The run's values of the settings the budget guard may change, as the user gives them. A
    setting left at None (or no selectors) does not apply to the run and is not offered."""

    selectors: tuple[str, ...] = ()  # --selector: the run's selectors, where switching them is possible
    pixels_per_step: Optional[int] = None  # --pixels-per-step k of the removal selectors
    exact_tail: float = 1.0  # F, kept by a selector switched to bgsis
    keep_fraction: float = 1.0  # --fraction: the subset whose boundary no k-step crosses
    image_size: Optional[int] = None  # --image-size: square side in pixels (folders and streamed runs)
    min_image_size: int = 1  # the smallest --image-size the run's config accepts
    max_workers: Optional[int] = None  # --max-workers: selection actors
    worker_slots: Optional[int] = None  # the most selection actors the cluster can hold (None: no bound known)
    max_images: Optional[int] = None  # --max-images: images per split (streamed runs' pilot)


@dataclass(frozen=True)
class CostPlan:
    """The cost of a whole run: its selection jobs and training stages, in the order they run, and
    the settings the budget guard may change (`knobs`)."""

    selections: tuple[SelectionCost, ...] = ()
    trainings: tuple[TrainingCost, ...] = ()
    knobs: Knobs = Knobs()
    rate_sources: tuple[tuple[str, str], ...] = ()  # (model, where its rates came from), as printed
    fixed_s: float = 0.0  # the run's own start and summary, seconds (RUN_S or STREAM_RUN_S; the alternatives keep it)
    explain_s: float = 0.0  # the explain stage (--explain), seconds: estimate_explain (the alternatives keep it)
    select_start_s: float = 0.0  # the selection pass's start (its actors serve every job), seconds, where any job has images

    @property
    def selection_seconds(self) -> float:
        start = self.select_start_s if any(c.n_images for c in self.selections) else 0.0
        return start + sum(c.eta_seconds for c in self.selections)

    @property
    def training_seconds(self) -> float:
        return sum(c.eta_seconds for c in self.trainings)

    @property
    def eta_seconds(self) -> float:
        return self.selection_seconds + self.training_seconds + self.fixed_s + self.explain_s  # the stages run one after the other

    @property
    def forward_passes(self) -> int:
        return sum(c.forward_passes for c in self.selections)

    @property
    def backward_passes(self) -> int:
        return sum(c.backward_passes for c in self.selections)

    def describe(self) -> str:
        """One line per job and stage, then the total; printed at the start of a run and by --dry-run."""
        lines = [f"cost (a backward pass counted as {BACKWARD_COST:g} forward passes):"]
        lines += [f"  rates      {model}: {how}" for model, how in self.rate_sources]
        lines += ["  " + c.describe() for c in self.trainings if c.stage == "full-image"]
        lines += ["  " + c.describe() for c in self.selections]
        if self.select_start_s and any(c.n_images for c in self.selections):
            lines.append(f"  selection  start ≈ {format_duration(self.select_start_s)} (one pass for every job: its actors start once)")
        lines += ["  " + c.describe() for c in self.trainings if c.stage != "full-image"]
        if self.explain_s:
            lines.append(f"  explain    ≈ {format_duration(self.explain_s)} (the diffusion prior and guided generation, "
                         "at the CPU rates of a 2-core VM)")
        if self.fixed_s:
            lines.append(f"  start and summary  ≈ {format_duration(self.fixed_s)} (Ray's start, the training stages' start, the summary)")
        lines.append(f"  total      ≈ {format_duration(self.eta_seconds)} (selection {self.forward_passes:,} passes "
                     + (f"+ {self.backward_passes:,} backward " if self.backward_passes else "")
                     + f"≈ {format_duration(self.selection_seconds)}, training ≈ {format_duration(self.training_seconds)})")
        return "\n".join(lines)

    def as_params(self) -> dict:
        """Flat {key: str | number} for MLflow params: totals, then each job's passes, rate and ETA."""
        out = {"cost.eta_s": round(self.eta_seconds, 1), "cost.eta": format_duration(self.eta_seconds),
               "cost.selection_eta_s": round(self.selection_seconds, 1), "cost.training_eta_s": round(self.training_seconds, 1),
               "cost.forward_passes": self.forward_passes, "cost.backward_passes": self.backward_passes,
               "cost.backward_cost": BACKWARD_COST, "cost.explain_eta_s": round(self.explain_s, 1),
               "cost.selection_start_s": round(self.select_start_s, 1)}
        out.update({_key(f"cost.rates.{model}"): how for model, how in self.rate_sources})
        for c in self.selections:
            key = _key(f"cost.select.{c.model}.{c.variant}.{c.tag}.{c.split}")
            out.update({f"{key}.images": c.n_images, f"{key}.passes_per_image": c.forward_per_image,
                        f"{key}.backward_per_image": c.backward_per_image, f"{key}.workers": c.workers,
                        f"{key}.rate": round(c.rate, 1), f"{key}.eta_s": round(c.eta_seconds, 1)})
        for c in self.trainings:
            key = _key(f"cost.train.{c.model}.{c.stage}")
            out.update({f"{key}.trials": c.trials, f"{key}.epochs": c.epochs, f"{key}.images": c.images,
                        f"{key}.concurrency": c.concurrency, f"{key}.rate": round(c.rate, 1), f"{key}.eta_s": round(c.eta_seconds, 1)})
        return out


def _key(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", s)  # what every MLflow version accepts in a param key


def _positive(name: str, value, integer: bool = True, low: int = 1) -> None:
    """ValueError unless value is an int >= low (integer), else a finite number > 0."""
    bad = isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float))
    if bad or not (value >= low if integer else 0 < value < math.inf):
        raise ValueError(f"{name} must be {f'an int >= {low}' if integer else 'a finite number > 0'}, got {value!r}")


def estimate_selection(
    model: str,
    variant: str,
    selector: str,
    split: str,
    *,
    params: Optional[Mapping] = None,
    n_images: int,
    hw: Union[int, tuple[int, int]],
    rate: float,
    workers: int = 1,
    select_batch: Optional[int] = None,
    tag: Optional[str] = None,
    start_s: float = 0.0,
    image_s: float = 0.0,
) -> SelectionCost:
    """The cost of one selection job: planned passes (selection/cost.py) at `rate` on `workers`.

    Args:
        selector, params: as a SelectionJob holds them ({"k": 4} for backselect k = 4).
        n_images: images to select.
        hw: H·W, or (H, W) (occlusion with a window > 1 needs it).
        rate: forward passes (images) per second of one worker (`calibrate_forward_rate`).
        workers: selection actors available; the job uses at most one per select batch.
        select_batch: images per actor call (RunConfig.select_batch). The busiest worker selects
            ceil(batches / workers) batches, which sets the ETA; None spreads images evenly.
        tag: the selector's store tag for the label (default: the selector's name).
        start_s: the job's fixed start-up (JOB_START_S for a pipeline's job), paid when it has images.
        image_s: seconds of one worker per image beside its passes (streamed: STREAM_SELECT_IMAGE_S).
    Returns:
        SelectionCost; eta = start + busiest worker's images × ((forward + BACKWARD_COST × backward) / rate + image_s).
    """
    _positive("n_images", n_images, low=0)
    _positive("workers", workers)
    _positive("rate", rate, integer=False)
    if select_batch is not None:
        _positive("select_batch", select_batch)
    params = dict(params or {})
    fwd, bwd = planned_passes(selector, hw, params)
    if select_batch is None:
        used = min(workers, max(n_images, 1))
        busiest = n_images / used
    else:
        batches = math.ceil(n_images / select_batch)
        used = max(1, min(workers, batches))
        busiest = min(n_images, math.ceil(batches / used) * select_batch)
    size = tuple(hw) if isinstance(hw, (tuple, list)) else hw
    start = start_s if n_images else 0.0
    return SelectionCost(model, variant, selector, params, tag or selector, split, n_images, size, fwd, bwd, workers, used,
                         select_batch, float(rate), start_s, start + busiest * ((fwd + BACKWARD_COST * bwd) / rate + image_s), image_s)


def estimate_training(model: str, stage: str, *, trials: int, epochs: int, images: int, rate: float,
                      concurrency: int = 1, start_s: float = 0.0, selections: int = 0, per_selection: int = 0,
                      image_s: float = 0.0) -> TrainingCost:
    """The cost of `trials` trials of one architecture, `concurrency` at once: they run in
    ceil(trials / concurrency) waves of start_s + epochs × images × (1 / rate + image_s) seconds each.

    rate: training images per second of one trial (`calibrate_train_rate`; trials that share a GPU
        share its rate, so calibrate with them sharing or divide).
    selections, per_selection: the subsets stage's stored selections and the trials on each (0 for
        the full-image stage); what switching selectors changes.
    """
    for name, value in (("trials", trials), ("images", images), ("selections", selections), ("per_selection", per_selection)):
        _positive(name, value, low=0)
    _positive("epochs", epochs)
    _positive("concurrency", concurrency)
    _positive("rate", rate, integer=False)
    used = max(1, min(concurrency, trials))
    waves = math.ceil(trials / used)
    return TrainingCost(model, stage, trials, epochs, images, concurrency, used, float(rate), start_s, selections, per_selection,
                        waves * (start_s + epochs * images * (1 / rate + image_s)), image_s)


# ---------------------------------------------------------------------------------------------
# Other settings: the same run priced again, from its rows alone


def estimate_explain(*, pixels: int, prior_steps: int, prior_batch: int, images: int, method: str, steps: int,
                     iterations: int, batch: int = 128) -> float:
    """Seconds of the explain stage: `pixels` C·H·W of one image; prior_steps of prior_batch images
    (0 with --generator); `images` guided images in batches of `batch`, each chain `steps` DDIM
    steps, iterations + 1 chains for the "noise" method, one for "universal"."""
    chains = iterations + 1 if method == "noise" else 1
    batches = -(-images // batch)
    return (EXPLAIN_START_S + prior_steps * prior_batch * pixels * PRIOR_PIXEL_S
            + chains * steps * (batches * GUIDED_STEP_S + images * pixels * GUIDED_PIXEL_S))


def reprice(plan: CostPlan, *, selector: Optional[str] = None, pixels_per_step: Optional[int] = None,
            image_size: Optional[int] = None, max_workers: Optional[int] = None, max_images: Optional[int] = None) -> CostPlan:
    """The cost of the run with other settings (the CLI's names; None keeps the run's):

    selector: every job runs it (with the run's k and F), once per source model, variant and split,
        and the subsets stage trains on that one selection.
    pixels_per_step: k of the removal selectors' jobs (selection/cost.py's formulas).
    image_size: square images of that side; every rate scales by the pixel ratio (forward and
        training cost grow about linearly with the pixels for convolutional nets) rather than being
        measured again. Needs the run's knobs.image_size.
    max_workers: selection actors offered; max_images: images per split, capped.
    Raises ValueError where a setting cannot apply (e.g. an occlusion window above the new side).
    """
    knobs, sels, trains = plan.knobs, plan.selections, plan.trainings
    if selector is not None:
        params = selector_params(selector, knobs.pixels_per_step or 1, knobs.exact_tail, keep_fraction=knobs.keep_fraction)
        jobs = {(c.model, c.variant, c.split): c.repriced(selector=selector, params=params) for c in sels}
        sels = tuple(jobs.values())  # the run's first selector's jobs (it alone also explains the other variants)
        trains = tuple(t.repriced(trials=t.trials - (t.selections - 1) * t.per_selection, selections=1) if t.selections > 1 else t
                       for t in trains)
        knobs = dataclasses.replace(knobs, selectors=(selector,))
    if pixels_per_step is not None:
        sels = tuple(c.repriced(params={**c.params, "k": pixels_per_step}) if c.selector in REMOVAL_SELECTORS else c for c in sels)
        knobs = dataclasses.replace(knobs, pixels_per_step=pixels_per_step)
    if image_size is not None:
        if not knobs.image_size:
            raise ValueError("--image-size does not apply to this run: its data set has a fixed image size")
        factor = knobs.image_size ** 2 / image_size ** 2  # fewer pixels, proportionally faster passes
        sels = tuple(c.repriced(hw=(image_size, image_size), rate=c.rate * factor) for c in sels)
        trains = tuple(t.repriced(rate=t.rate * factor) for t in trains)
        knobs = dataclasses.replace(knobs, image_size=image_size)
    if max_workers is not None:
        sels = tuple(c.repriced(workers=max_workers) for c in sels)
        knobs = dataclasses.replace(knobs, max_workers=max_workers)
    if max_images is not None:
        sels = tuple(c.repriced(n_images=min(c.n_images, max_images)) for c in sels)
        trains = tuple(t.repriced(images=min(t.images, max_images)) for t in trains)
        knobs = dataclasses.replace(knobs, max_images=max_images)
    return dataclasses.replace(plan, selections=sels, trainings=trains, knobs=knobs)


STANDARD_PIXELS_PER_STEP = (16, 64, 256)
FAST_SELECTOR = "bgsis"
WORKER_FACTOR = 4
PILOT_DIVISORS = (2, 10, 100, 1000)  # --max-images tried: a half, a tenth, ... of the images


def alternatives_for(plan: CostPlan) -> list[tuple[str, CostPlan]]:
    """The standard faster settings the plan's knobs allow, each priced by `reprice`, least drastic
    first within a flag; a setting that cannot apply to the plan is left out.

    Returns:
        [(flag, plan)], e.g. ("--selector bgsis", ...), ("--pixels-per-step 16", ...),
        ("--image-size 112", ...), ("--max-workers 16", ...), ("--max-images 1000", ...).
    """
    k = plan.knobs
    tries: list[tuple[str, dict]] = []
    if k.selectors and k.selectors != (FAST_SELECTOR,):
        tries.append((f"--selector {FAST_SELECTOR}", {"selector": FAST_SELECTOR}))
    if k.pixels_per_step is not None:
        tries += [(f"--pixels-per-step {n}", {"pixels_per_step": n}) for n in STANDARD_PIXELS_PER_STEP if n > k.pixels_per_step]
    if k.image_size:
        for s in sorted({k.image_size // 2, 32}, reverse=True):
            if max(1, k.min_image_size) <= s < k.image_size:
                tries.append((f"--image-size {s}", {"image_size": s}))
    more = WORKER_FACTOR * k.max_workers if k.max_workers else 0
    if k.worker_slots is not None:
        more = min(more, k.worker_slots)  # more actors than the cluster can hold would only queue
    if k.max_workers and more > k.max_workers:
        tries.append((f"--max-workers {more}", {"max_workers": more}))
    if k.max_images:  # a pilot on fewer images (sis_imagenet.py)
        n = k.max_images
        tries += [(f"--max-images {m}", {"max_images": m}) for m in dict.fromkeys(n // d for d in PILOT_DIVISORS) if 0 < m < n]
    out = []
    for label, settings in tries:
        try:
            out.append((label, reprice(plan, **settings)))
        except ValueError:
            continue  # e.g. an occlusion window wider than the smaller image: not a choice to offer
    return out


# ---------------------------------------------------------------------------------------------
# The budget guard


class BudgetExceeded(ValueError):
    """The plan's ETA is over --max-hours; the message names faster settings and their ETAs."""


def check_budget(plan: CostPlan, max_hours: float, alternatives: Optional[Sequence[tuple[str, CostPlan]]] = None) -> None:
    """Raise BudgetExceeded when the plan needs more than `max_hours`; 0 turns the guard off.

    alternatives: (flag as the user would type it, e.g. "--pixels-per-step 64", its CostPlan), least
        drastic first; None: `alternatives_for(plan)`. The message keeps those faster than the plan
        and, per flag, the first that fits the budget, else that flag's fastest.
    """
    if isinstance(max_hours, bool) or not isinstance(max_hours, (int, float)) or not max_hours >= 0:
        raise ValueError(f"--max-hours must be a number >= 0 (0 turns the budget guard off), got {max_hours!r}")
    budget = max_hours * 3600
    if max_hours == 0 or plan.eta_seconds <= budget:
        return
    chosen: dict[str, tuple[str, CostPlan]] = {}
    for label, alt in alternatives_for(plan) if alternatives is None else alternatives:
        if alt.eta_seconds >= plan.eta_seconds:
            continue
        flag = label.split(" ", 1)[0]
        best = chosen.get(flag)
        if best is None or (best[1].eta_seconds > budget and alt.eta_seconds < best[1].eta_seconds):
            chosen[flag] = (label, alt)
    tries = ", ".join(f"{label} (≈ {format_duration(alt.eta_seconds)})" for label, alt in chosen.values())
    raise BudgetExceeded(f"the plan needs ≈ {format_duration(plan.eta_seconds)} (> --max-hours {max_hours:g})"
                         + (f": try {tries}" if tries else "") + "; --max-hours 0 turns this guard off")
