"""Tune trials: failed trials are retried, and named in one line when they still fail."""

from __future__ import annotations

import os

import pytest
from ray.exceptions import ActorDiedError
from ray.tune import Result

from overinterp.pipeline.resources import ResourcePlan
from overinterp.pipeline.trial import TrialSpec
from overinterp.pipeline.tune_stage import TRIAL_RETRIES, TrialsFailed, failure_message, launch_trials

SPEC = TrialSpec(model="digits_cnn", seed=1)
NEVER_RAN = "/tmp/tune/full/_trainable_6a1d4_00001_1_trial=model_digits_cnn_seed_1_subset_None_fill_mean_input_dropout_0_0_2026-12-01_19-14-22"


def _plan(cpus: float = 1) -> ResourcePlan:
    return ResourcePlan(use_gpu=False, select_workers=1, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=1,
                        cpus_per_trial=cpus, gpus_per_trial=0, capacity="test", max_cpus=2)


def test_failure_message_names_trials_that_never_reported_a_config():
    """A trial whose actor died before it reported has `Result.config` None (seen on the fake cluster:
    the listing itself crashed with a TypeError)."""
    lost = Result(metrics=None, checkpoint=None, error=ActorDiedError(), path=NEVER_RAN)
    failed = Result(metrics={"config": {"trial": SPEC.__dict__}}, checkpoint=None, error=ValueError("loss is nan\nmore detail"),
                    path="/tmp/tune/full/x")
    ok = Result(metrics={"config": {"trial": SPEC.__dict__}, "accuracy": 0.5}, checkpoint=None, error=None, path="/tmp/tune/full/y")
    msg = failure_message("full", [lost, failed, ok])
    assert "\n" not in msg
    assert msg.startswith(f"[full] 2 of 3 trial(s) failed after {TRIAL_RETRIES} retries each: ")
    assert os.path.basename(NEVER_RAN) in msg and SPEC.name in msg
    assert msg.endswith("first error: ActorDiedError: The actor died unexpectedly before finishing this task.")


# Trainables are defined inside the tests: Ray workers cannot import this test module, and cloudpickle
# sends nested functions by value.


def test_a_trial_whose_worker_dies_runs_again(ray_session, tmp_path):
    attempts = str(tmp_path / "attempts")
    os.mkdir(attempts)

    def dies_first_time(config: dict) -> None:
        from ray import tune

        attempt = len(os.listdir(attempts))
        open(os.path.join(attempts, str(attempt)), "w").close()
        if attempt == 0:
            os._exit(1)  # the trial's worker process dies, as on a lost node
        tune.report({"attempts": attempt + 1, "done": True})

    launch_trials("full", [SPEC], dies_first_time, str(tmp_path / "out"), _plan(), total=1)
    assert sorted(os.listdir(attempts)) == ["0", "1"]  # died once, then finished


def test_a_trial_that_keeps_failing_is_named(ray_session, tmp_path):
    attempts = str(tmp_path / "attempts")
    os.mkdir(attempts)

    def always_fails(config: dict) -> None:
        open(os.path.join(attempts, str(len(os.listdir(attempts)))), "w").close()
        raise ValueError("a deterministic bug")

    with pytest.raises(TrialsFailed) as e:
        launch_trials("full", [SPEC], always_fails, str(tmp_path / "out"), _plan(), total=1)
    assert len(os.listdir(attempts)) == 1 + TRIAL_RETRIES  # tried again as many times as it says, no more
    assert "\n" not in str(e.value) and "[full] 1 of 1 trial(s) failed" in str(e.value)
    assert str(e.value).endswith("first error: ValueError: a deterministic bug")
