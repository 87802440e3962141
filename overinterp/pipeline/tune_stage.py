"""Training trials on Ray Tune: one trial per TrialSpec (model, seed, subset and fill, input dropout).

Every trial runs `trial.run_trial`, which writes its checkpoint and result.json into the run's
out_dir; trials already finished there are not launched again. Each trial asks for the planned
resources (a whole GPU each where the cluster can have GPUs, unless the user asked for fractions),
and reports every epoch to Tune. Tune's own storage (logs, trial state) goes to <out_dir>/tune.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch
from ray import tune

from overinterp import fs
from overinterp.pipeline.resources import ResourcePlan, exit_with_parent, worker_device
from overinterp.pipeline.trial import TrialSpec, load_result, run_trial
from overinterp.training import TrainConfig


# Tune restarts a failed trial this many times (a lost node, a preempted worker) before it counts as
# failed. An in-memory trial (run_trial) starts again from epoch 0: it writes its checkpoint only when
# it ends; a streamed trial (train_stream) resumes from its last per-epoch checkpoint in out_dir. A
# deterministic bug also costs this many reruns before it is reported: Tune's FailureConfig cannot
# tell the two apart.
TRIAL_RETRIES = 2


class TrialsFailed(RuntimeError):
    pass


def _trial_name(result) -> str:
    """The spec's name; a trial that failed before it reported anything has no config in its Result
    (the config travels with reported metrics), so then Tune's trial directory name, which holds the
    trial id and its parameters."""
    config = result.config or {}
    if "trial" in config:
        return TrialSpec(**config["trial"]).name
    return os.path.basename(str(result.path).rstrip("/")) if result.path else "a trial with no directory"


def _one_line(error: BaseException) -> str:
    """`Type: first line` of an error; for a Ray task error, of the exception it wraps."""
    cause = getattr(error, "cause", None) or error
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else '(no message)'}"


def failure_message(stage: str, results: list) -> str:
    """One line naming each failed trial of a ResultGrid and the first error."""
    failed = [r for r in results if r.error is not None]
    return (f"[{stage}] {len(failed)} of {len(results)} trial(s) failed after {TRIAL_RETRIES} retries each: "
            f"{', '.join(_trial_name(r) for r in failed)}; first error: {_one_line(failed[0].error)}")


class _Progress(tune.Callback):
    """A progress bar of finished trials instead of Tune's status tables (with -v: one line per
    trial, its accuracy and time)."""

    def __init__(self, stage: str, total: int, done: int, clock: Callable[[], float] = time.time):
        # wall-clock seconds (not monotonic): Tune pickles its callbacks, and t0 must mean the same after
        self.stage, self.total, self.done, self.clock = stage, total, done, clock
        self.t0 = clock()  # the launch: the bar's rate and ETA count from here, not from the first finished trial
        self.bar = None  # made in the driver when the first trial ends: Tune pickles its callbacks, a bar holds a lock

    def __getstate__(self):
        return {**self.__dict__, "bar": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        from overinterp.pipeline import terminal
        from overinterp.progress import Progress

        if self.bar is None:
            self.bar = Progress(self.total - self.done, "trials", f"training ({self.stage})", clock=self.clock, start=self.t0)
        self.done += 1
        self.bar.update(1)
        if not terminal.VERBOSE:
            return
        result = trial.last_result or {}
        name = TrialSpec(**trial.config["trial"]).name
        acc = result.get("accuracy")
        acc_s = f"test accuracy {100 * acc:.1f}%" if acc is not None else "finished"
        print(f"[{self.stage}] {self.done}/{self.total} {name}: {acc_s} ({result.get('seconds', 0):.0f} s; stage {time.time() - self.t0:.0f} s)",
              flush=True)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] FAILED {TrialSpec(**trial.config['trial']).name} (see {trial.local_path})", flush=True)


def _trainable(config: dict, data=None, masks=None, train_config=None, out_dir=None):
    torch.set_num_threads(int(config["threads"]))
    spec = TrialSpec(**config["trial"])

    def report(epoch: int, loss: float, val_accuracy: float) -> None:
        tune.report({"epoch": epoch, "train_loss": loss, "val_accuracy": val_accuracy})

    result = run_trial(spec, data, masks, train_config, out_dir, device=worker_device(), report=report)
    tune.report({"epoch": len(result["losses"]) - 1, "accuracy": result["accuracy"], "train_loss": result["train_loss"],
                 "seconds": result["seconds"], "done": True})


def launch_trials(
    stage: str,
    pending: list[TrialSpec],
    trainable: Callable,
    out_dir: str,
    resources: ResourcePlan,
    total: int,
    callbacks: Optional[list] = None,
) -> None:
    """Run `trainable` for each pending spec on Tune with the planned resources; raises TrialsFailed."""
    @functools.wraps(trainable)  # Tune names trials and their folders after the function
    def in_trial(config: dict):
        exit_with_parent()  # a trial's process ends with its raylet
        return trainable(config)

    tuner = tune.Tuner(
        tune.with_resources(in_trial, resources.trial_request()),
        param_space={"trial": tune.grid_search([asdict(s) for s in pending]), "threads": max(1, int(resources.cpus_per_trial))},
        # reuse_actors: one worker process trains many trials (saves ~5 s of start-up each)
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=resources.trial_concurrency),
        run_config=tune.RunConfig(
            name=stage, storage_path=fs.join(out_dir, "tune"), verbose=0,  # Tune writes to local paths and s3:// alike
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),  # a trial whose node is lost runs again
            callbacks=[_Progress(stage, total, total - len(pending)), *(callbacks or [])],
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise TrialsFailed(failure_message(stage, list(grid)))


def run_trials(
    stage: str,
    specs: list[TrialSpec],
    data: dict,
    masks: dict,
    train_config: TrainConfig,
    out_dir: str,
    resources: ResourcePlan,
    callbacks: Optional[list] = None,
) -> dict[str, dict]:
    """Run every unfinished in-memory trial on Tune; returns {trial name: result} for all specs.

    Raises TrialsFailed naming the failed trials; finished ones stay on disk for the rerun.
    """
    pending = [s for s in specs if load_result(out_dir, s) is None]
    print(f"[{stage}] {len(specs) - len(pending)} of {len(specs)} trials already finished in {out_dir}", flush=True)
    if pending:
        needed = {s.subset for s in pending if s.subset is not None}
        trainable = tune.with_parameters(_trainable, data=data, masks={k: v for k, v in masks.items() if k in needed},
                                         train_config=train_config, out_dir=out_dir)
        launch_trials(stage, pending, trainable, out_dir, resources, len(specs), callbacks)
    return collect_results(stage, specs, out_dir)


def collect_results(stage: str, specs: list[TrialSpec], out_dir: str) -> dict[str, dict]:
    """{trial name: result} of every spec, once the stage's trials have run: each finished trial's
    checkpoint was verified when the stage decided what to run, or written by this stage."""
    results = {}
    for s in specs:
        r = load_result(out_dir, s, verify_checkpoint=False)
        if r is None:
            raise TrialsFailed(f"[{stage}] trial {s.name} reported no result in {out_dir}/trials")
        results[s.name] = r
    return results
