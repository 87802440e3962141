"""Training trials on Ray Tune: one trial per (model, seed, condition, input dropout).

Every trial runs `trial.run_trial`, which writes its checkpoint and result.json into the run's
out_dir; trials already finished there are not launched again. Tune's own storage (logs, trial
state) goes to <out_dir>/tune.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from ray import tune

from overinterp import fs
from overinterp.pipeline.resources import Resources
from overinterp.pipeline.trial import TrialSpec, load_result, run_trial
from overinterp.training import TrainConfig


class TrialsFailed(RuntimeError):
    pass


class _Progress(tune.Callback):
    """One line per finished trial instead of Tune's status tables."""

    def __init__(self, stage: str, total: int, done: int):
        self.stage, self.total, self.done, self.t0 = stage, total, done, time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.done += 1
        name = TrialSpec(**trial.config["trial"]).name
        print(f"[{self.stage}] {self.done}/{self.total} {name}: test accuracy {100 * result['accuracy']:.1f}% "
              f"({result['seconds']:.0f} s; stage {time.time() - self.t0:.0f} s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] FAILED {TrialSpec(**trial.config['trial']).name} (see {trial.local_path})", flush=True)


def _trainable(config: dict, data=None, masks=None, train_config=None, out_dir=None):
    torch.set_num_threads(int(config["threads"]))
    spec = TrialSpec(**config["trial"])
    result = run_trial(spec, data, masks, train_config, out_dir)
    tune.report({"accuracy": result["accuracy"], "train_loss": result["train_loss"], "seconds": result["seconds"]})


def run_trials(
    stage: str,
    specs: list[TrialSpec],
    data: dict,
    masks: dict,
    train_config: TrainConfig,
    out_dir: str,
    resources: Resources,
    gpus_per_trial: int = 1,
) -> dict[str, dict]:
    """Run every unfinished trial on Tune; returns {trial name: result} for all specs.

    gpus_per_trial: GPUs each trial gets where the cluster has GPUs (DataParallel inside).

    Raises TrialsFailed naming the failed trials; finished ones stay on disk for the rerun.
    """
    pending = [s for s in specs if load_result(out_dir, s) is None]
    print(f"[{stage}] {len(specs) - len(pending)} of {len(specs)} trials already finished in {out_dir}", flush=True)
    if pending:
        per = {"cpu": 1, "gpu": gpus_per_trial if resources.use_gpu else 0}
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, data=data, masks=masks, train_config=train_config, out_dir=out_dir), per
        )
        storage = fs.join(out_dir, "tune")  # Tune writes to local paths and s3:// alike
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([asdict(s) for s in pending]), "threads": 1},
            # reuse_actors: one worker process trains many trials (saves ~5 s of start-up each)
            tune_config=tune.TuneConfig(metric="accuracy", mode="max", reuse_actors=True),
            run_config=tune.RunConfig(
                name=stage, storage_path=storage, verbose=0,
                callbacks=[_Progress(stage, len(specs), len(specs) - len(pending))],
            ),
        )
        grid = tuner.fit()
        if grid.errors:
            failed = [r.config["trial"] for r in grid if r.error]
            raise TrialsFailed(f"[{stage}] {len(grid.errors)} trial(s) failed: {failed}; first error: {grid.errors[0]}")
    results = {}
    for s in specs:
        r = load_result(out_dir, s)
        if r is None:
            raise TrialsFailed(f"[{stage}] trial {s.name} reported no result in {out_dir}/trials")
        results[s.name] = r
    return results
