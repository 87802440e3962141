"""The driver of every run: prepare (preflight -> source -> plan -> resources), price it and guard
the budget, and only then start Ray and walk the Plan stage by stage. Until the plan is accepted no
Ray node starts and no task runs: a dry run or a refused plan costs seconds on the driver.

The source decides the data backend: `memory.InMemoryBackend` holds the images (digits, CIFAR, an
ImageFolder that fits in memory) and trains with Ray Tune; `stream.StreamBackend` streams them
through Ray Data (any ImageFolder or Parquet source, local or s3://) and trains with Ray Train
inside Tune trials. A backend only moves data and calls stages; everything else — stage order, what
is skipped on a rerun, the summary's shape, reports and tracking — lives here once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from typing import Optional, Protocol

from overinterp import fs
from overinterp.config import IN_MEMORY_ONLY, RunConfig
from overinterp.pipeline.plan import SPLITS, Plan, SelectionJob, make_plan
from overinterp.pipeline.analysis import Analysis, TestImages, copy_out, write_summary
from overinterp.pipeline.terminal import log
from overinterp.pipeline.trial import TrialSpec
from overinterp.selection.params import REMOVAL_SELECTORS


class Backend(Protocol):
    """Data access and stage calls, nothing else: the analysis is `analysis.Analysis`, the same for both."""

    def train_full(self, specs: list[TrialSpec]) -> dict[str, dict]: ...
    def select(self, jobs: list[SelectionJob]) -> None: ...  # every selection of the plan
    def write_random(self, split: str) -> None: ...
    def train_subsets(self, specs: list[TrialSpec]) -> dict[str, dict]: ...
    def baseline(self, test: TestImages) -> Optional[dict]: ...  # a pretrained model's top-1 over the whole test split where `test` is less of it
    def test_images(self) -> TestImages: ...  # the test images the analysis looks at
    def skipped_images(self) -> dict: ...  # {split: skipped_summary} of image files that did not decode (summary.json)
    def dataset_input(self) -> dict: ...  # {name, source, digest[, images, labels]} for MLflow's dataset input
    def models_to_log(self) -> dict: ...  # {trial name: (model, example input)} of the full-image models
    def prior_images(self): ...  # (N, C, H, W) uint8 train images the explain stage's prior learns from (None: streamed)


class RunStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the driver: a KeyboardInterrupt, so no `except Exception` holds it up
    on its way out through the lock and the MLflow parent."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals():
    """While a run holds its --out: SIGTERM (`ray job stop`, a pod's termination, `timeout`) and SIGINT
    (also sent by a script, whose background jobs start with SIGINT ignored) raise RunStopped in the
    main thread, so the lock is released and the MLflow parent is closed before the process exits.
    Ray's core worker installs a handler for SIGTERM that dumps a stack and aborts: this replaces it
    for the run and puts it back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    received = []

    def stop(signum, frame):
        received.append(signum)
        raise RunStopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    # Tune would put its own SIGINT handler in (it ends the experiment quietly, and stays installed
    # after Tuner.fit returns, swallowing the next SIGINT): the run's handler holds throughout
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    except KeyboardInterrupt as e:
        if received and not isinstance(e, RunStopped):  # Tune re-raises a plain KeyboardInterrupt: name the signal again
            raise RunStopped(received[-1]) from e
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tune_sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint


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


def run_plan(cfg: RunConfig, plan: Plan, backend: Backend, tracker) -> dict:
    """Walk the plan, logging to `tracker` (a tracking.Tracker); returns the summary (also in <out>/summary.json)."""
    tracker.log_data(backend.dataset_input())
    stages = Stages((4 if plan.full_trials else 3) + bool(cfg.explain))
    full = {}
    if plan.full_trials:
        full = stages.run(f"training {len(plan.full_trials)} full-image models", backend.train_full, list(plan.full_trials))

    def select_all():
        backend.select(list(plan.selections))
        for split in SPLITS:
            backend.write_random(split)

    stages.run(f"selection ({', '.join(sorted({j.tag for j in plan.selections}))}) and the random baseline", select_all)
    subsets = stages.run(f"training {len(plan.subset_trials)} models on {100 * plan.fraction:g}% pixel-subsets",
                         backend.train_subsets, list(plan.subset_trials))

    # the analysis's test images: decoded inside the stage that first needs them, so that its time is counted there
    test = None
    explained = None
    if cfg.explain:
        test = backend.test_images()
        from overinterp.pipeline.explain_stage import run_explain

        explained = stages.run(f"explain ({', '.join(cfg.explain)}; guidance {cfg.explain_method})", run_explain,
                               cfg, plan, test, backend.prior_images(), backend.resources)
        tracker.log_prior(explained["prior"])

    def compare():
        analysis = Analysis(cfg, plan, test if test is not None else backend.test_images())
        summary = analysis.summary(full, subsets, backend.baseline(analysis.test), backend.skipped_images())
        # the report files are drawn here, then copied to --out and logged to MLflow (both copy them)
        with tempfile.TemporaryDirectory(prefix="overinterp-report-") as local:
            reports = analysis.reports(summary, local)  # first: it lists its plots in the summary, which summary.md embeds
            if explained is not None:
                from overinterp.pipeline.explain_stage import gallery_files

                galleries = gallery_files(explained["galleries"], test.classes, local)
                copy_out(galleries, cfg.out_dir)
                summary["explain"] = {**explained["section"], "galleries": [os.path.basename(p) for p in galleries]}
                reports += galleries
            files = write_summary(plan, summary, local) + reports
            tracker.log_results(plan, full, subsets, summary, files, backend.models_to_log())
        summary["mlflow_run_id"] = tracker.run_id
        return summary

    return stages.run("summary", compare)


# An in-memory run holds the uint8 images in the driver, in Ray's object store (once per trial
# wave) and as float32 batches in each trial: in memory only while the uint8 images take at most
# this fraction of the machine's memory, streamed otherwise.
IN_MEMORY_SHARE = 1 / 32


def machine_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_backend(cfg: RunConfig, n_images: Optional[int], side: int, memory: Optional[int] = None) -> tuple[bool, str]:
    """(stream?, the reason as one line). digits and CIFAR are held in memory; Parquet and
    --train/--val sources stream; a --data-root ImageFolder is held when its uint8 images fit
    IN_MEMORY_SHARE of the memory. --stream / --no-stream decide where given."""
    if cfg.dataset in IN_MEMORY_ONLY:
        return False, f"{cfg.dataset} is held in memory"
    size = "" if n_images is None else f"{n_images:,} images of 3×{side}×{side} = {n_images * 3 * side * side / 2**20:,.0f} MiB as uint8"
    if cfg.stream is not None:
        return cfg.stream, f"{'streamed' if cfg.stream else 'in memory'}, as --{'' if cfg.stream else 'no-'}stream asks"
    if cfg.dataset == "parquet" or cfg.data_root is None or fs.is_uri(cfg.data_root):
        return True, f"streamed through Ray Data (a {'Parquet' if cfg.dataset == 'parquet' else '--train/--val'} source{'; ' + size if size else ''})"
    budget = (memory or machine_memory()) * IN_MEMORY_SHARE
    fits = n_images * 3 * side * side <= budget
    return (not fits), (f"{'in memory' if fits else 'streamed'}: {size} {'fits' if fits else 'exceeds'} "
                        f"{budget / 2**20:,.0f} MiB ({IN_MEMORY_SHARE:.0%} of this machine's memory; --{'' if fits else 'no-'}stream overrides)")


def prepare(config: RunConfig, ray_address: Optional[str] = None):
    """Preflight, open the source (in memory or streamed), plan, and plan resources from what the
    cluster can offer (`resources.find_capacity`: no Ray node starts; a cluster address is joined).

    Returns (cfg, source, plan, resources): cfg resolved with `stream` decided; source the loaded
    ImageDataset or the StreamSource. Writes nothing to --out (the budget guard and --dry-run must
    leave it untouched)."""
    import dataclasses

    from overinterp.config import ResourceFlags
    from overinterp.pipeline.images import forget_listings
    from overinterp.pipeline.preflight import preflight
    from overinterp.pipeline.resources import find_capacity, plan_resources

    forget_listings()  # this run lists each folder afresh, once: the count below and StreamSource.open share it
    cfg = preflight(config)
    n_images, side = None, cfg.image_size or 0
    if cfg.dataset == "imagefolder" and cfg.stream is None and cfg.data_root and not fs.is_uri(cfg.data_root):
        from overinterp.pipeline.images import list_classes
        from overinterp.pipeline.stream import count_images  # a listing: nothing is decoded

        classes = list_classes(cfg.train)
        n_images = sum(count_images(p, classes, None) for p in (cfg.train, cfg.val))
    stream, why = choose_backend(cfg, n_images, side)
    cfg = dataclasses.replace(cfg, stream=stream)  # its checks refuse --explain on a folder too big for memory, without --generator
    log(f"source: {cfg.dataset} {cfg.data_root or cfg.train or ''}".rstrip() + f": {why}")
    if not stream and cfg.workers_per_trial > 1:  # decided here for a folder, so not refused with the other flags
        log(f"--workers-per-trial {cfg.workers_per_trial} applies to streamed trials: this run holds its images in memory and "
            "trains each trial in one process (--stream streams them)")
    removal_flags = [f for f, given in ((f"--pixels-per-step {cfg.pixels_per_step}", cfg.pixels_per_step != RunConfig.pixels_per_step),
                                        (f"--exact-tail {cfg.exact_tail:g}", cfg.exact_tail != RunConfig.exact_tail)) if given]
    if removal_flags and not set(cfg.selectors) & set(REMOVAL_SELECTORS):
        log(f"{' and '.join(removal_flags)}: only {' and '.join(REMOVAL_SELECTORS)} remove pixels in steps; "
            f"{', '.join(cfg.selectors)} rank{'s' if len(cfg.selectors) == 1 else ''} the pixels once, so this run does not use them")
    if stream:
        from overinterp.pipeline.stream import StreamSource

        source = StreamSource.open(cfg)
        plan = make_plan(cfg, source.shape, source.n_images, source.num_classes)
    else:
        from overinterp.pipeline.memory import load_data

        log(f"loading {cfg.dataset}{' (smoke subsample)' if cfg.smoke else ''}")
        source = load_data(cfg)
        plan = make_plan(cfg, source.shape, {s: len(source.labels[s]) for s in SPLITS}, source.num_classes)
        if cfg.pretrained:  # fail now, not in a worker, if its weights do not fit the data's classes and channels
            from overinterp.models import create_model

            create_model(**next(iter(plan.sources[cfg.models[0]].values())).model)
    resources = plan_resources(find_capacity(ray_address), ResourceFlags(**cfg.resource_flags()))
    if stream:  # its trials' Train workers leave CPUs to the Ray Data that feeds them: fewer trials at once
        resources = dataclasses.replace(resources, trial_concurrency=resources.streamed_trial_concurrency(cfg.workers_per_trial))
    return cfg, source, plan, resources


def run(config: RunConfig, ray_address: Optional[str] = None, dry_run: bool = False, holder: str = "overinterp run") -> Optional[dict]:
    """Run (or resume) the whole pipeline on any source; returns the summary also written to summary.json.

    First the plan: stages, resources, forward passes and an ETA from a short calibration on the
    driver's CPU; a plan over --max-hours stops here (BudgetExceeded, before anything is written),
    and so does --dry-run (returns None), both before Ray starts. Then Ray starts (or `ray_address`
    is joined), and the run holds the lock of its --out throughout (a second run on it stops at
    once; `holder` names this one in the lock), records its settings and walks the plan under an
    MLflow parent.
    """
    t0 = time.time()  # "done in" counts the imports too
    from overinterp.costplan import format_duration
    from overinterp.pipeline import resources as cluster
    from overinterp.pipeline.costing import plan_and_guard
    from overinterp.pipeline.lock import OutputLock
    from overinterp.pipeline.preflight import record_settings

    cfg, source, plan, resources = prepare(config, ray_address)
    log(plan.describe())
    log(resources.describe())
    if cfg.autocast and not resources.use_gpu:
        log(f"--autocast {cfg.autocast} needs GPUs; this cluster has none, so selection runs exact fp32 on CPU")
    if cfg.stream:  # each backend's imports only: the streamed one loads Ray Data
        from overinterp.pipeline.stream import StreamBackend
    else:
        from overinterp.pipeline.memory import InMemoryBackend
    cost, cost_text = plan_and_guard(cfg, plan, resources, enforce=not dry_run)
    if dry_run:
        log("dry run: nothing selected, trained or written")
        return None
    cluster.ensure_ray(ray_address)
    try:
        with stopped_by_signals(), OutputLock(cfg.out_dir, holder) as lock:
            record_settings(cfg)
            from overinterp.pipeline.tracking import Tracker, TrialLogger  # MLflow only where tracking happens

            with Tracker(cfg, cfg.dataset, resources, previous_holder=lock.taken_over) as tracker:
                tracker.log_plan("\n".join([plan.describe(), resources.describe(), cost_text]), cost)
                callbacks = [TrialLogger(tracker)]
                if cfg.stream:
                    backend = StreamBackend(cfg, plan, source, resources, callbacks)
                else:
                    backend = InMemoryBackend(cfg, plan, source, resources, callbacks)
                summary = run_plan(cfg, plan, backend, tracker)
    except Exception as e:  # a full disk surfaces from SQLite, Ray workers, Tune trials or torch.save: one line for all
        if fs.out_of_space(e):
            raise fs.no_space_error(cfg.out_dir) from e
        raise
    log(f"done in {time.time() - t0:.0f} s (planned {format_duration(cost.eta_seconds)})")
    return summary
