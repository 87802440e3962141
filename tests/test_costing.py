"""The plan before the work: --dry-run on every kind of data set, the budget guard, --smoke's
stated pass bound. In-process through the session's local Ray."""

import os
import re

import numpy as np
import pytest

from overinterp.cli import main
from overinterp.config import SMOKE_MAX_PASSES
from overinterp.costplan import RUN_S, reprice
from overinterp.pipeline.costing import knobs_of, plan_cost
from overinterp.pipeline.resources import ResourcePlan

pytestmark = pytest.mark.ray


RESOURCES = ResourcePlan(use_gpu=False, select_workers=2, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=2, cpus_per_trial=1,
                         gpus_per_trial=0, capacity="test")


# The two helpers below are the only places that build configs and plans.


def _small_plan(side=4, n_train=8, n_test=4, **changes):
    """(cfg, plan) of `overinterp run` on 1×side×side images: digits_cnn, seeds 0 and 1, input dropout."""
    from overinterp.config import RunConfig
    from overinterp.pipeline.plan import make_plan

    settings = dict(models=("digits_cnn",), seeds=(0, 1), input_dropout=0.2, out_dir="/tmp/x", selectors=("backselect",), fills=("mean",))
    cfg = RunConfig(**{**settings, **changes}).resolved()
    return cfg, make_plan(cfg, (1, side, side), {"train": n_train, "test": n_test}, 10)


def _stream_plan(image_size, n_images, **changes):
    """(cfg, plan) of a streamed run explaining a pretrained tv:resnet18 (10 classes)."""
    from overinterp.config import RunConfig
    from overinterp.pipeline.plan import make_plan

    settings = dict(train="/t", val="/v", pretrained="tv:resnet18", selectors=("bgsis",), pixels_per_step=100, fraction=0.1, seeds=(0,),
                    input_dropout=0.0, fills=("mean",), stream=True, out_dir="/tmp/y", image_size=image_size)
    cfg = RunConfig(**{**settings, **changes}).resolved()
    return cfg, make_plan(cfg, (3, image_size, image_size), n_images, 10)


def test_plan_cost_of_a_small_plan():
    _, plan = _small_plan()
    cost = plan_cost(plan, forward_rates={"digits_cnn": 136.0}, train_rates=16.0, select_workers=1, trial_concurrency=2, epochs=2)
    by_label = {c.label: c.eta_seconds for c in cost.selections}
    # 136 passes per 4x4 image at 136 img/s: 1 s an image; the ensemble of 2 runs at half the rate; the jobs
    # share one pass, which starts in JOB_START_S (10 s), and each wave of trials starts in TRIAL_START_S (1 s)
    assert by_label == {"digits_cnn/plain backselect train": 8.0, "digits_cnn/plain backselect test": 4.0,
                        "digits_cnn/ensemble backselect test": 8.0, "digits_cnn/input-dropout backselect test": 4.0}
    assert cost.selection_seconds == 24.0 + 10.0
    # full: 4 trials (2 seeds, plain and input dropout) in 2 waves of 2 epochs × 8 images / 16 img/s;
    # subsets: 6 trials (subset, positions, random per seed) in 3 waves
    assert [(t.stage, t.trials, t.eta_seconds) for t in cost.trainings] == [("full-image", 4, 4.0), ("subsets", 6, 6.0)]
    assert [(t.selections, t.per_selection) for t in cost.trainings] == [(0, 0), (1, 4)]
    assert cost.eta_seconds == 34.0 + 10.0 + RUN_S and cost.forward_passes == (8 + 4 + 4 + 4) * 136
    params = cost.as_params()
    assert params["cost.eta_s"] == 44.0 + RUN_S and params["cost.select.digits_cnn.ensemble.backselect.test.eta_s"] == 8.0
    assert params["cost.selection_start_s"] == 10.0
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-/]+", k) and isinstance(v, (str, int, float)) for k, v in params.items())
    with pytest.raises(ValueError, match="no forward rate for model 'digits_cnn'"):
        plan_cost(plan, forward_rates={"resnet20": 1.0}, train_rates=1.0, select_workers=1, trial_concurrency=1, epochs=1)


def test_a_resumed_out_is_priced_for_what_is_left(tmp_path):
    """Finished.of reads an --out: stored rows from the shards' footers (a shard that does not read
    counts 0), finished trials from their result.json; plan_cost leaves both out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from overinterp import fs
    from overinterp.pipeline.costing import Finished
    from overinterp.pipeline.trial import trial_dir

    _, plan = _small_plan(out_dir=str(tmp_path / "out"))
    assert Finished.of(plan) == Finished() and Finished().describe(plan) is None
    train_job = next(j for j in plan.selections if j.split == "train")
    shards = os.path.join(plan.root, train_job.source.tag, train_job.tag, "train")
    os.makedirs(shards)
    pq.write_table(pa.table({"image_id": np.arange(5)}), os.path.join(shards, "part-a.parquet"))
    pq.write_table(pa.table({"image_id": np.arange(5, 6)}), os.path.join(shards, "part-b.parquet"))
    with open(os.path.join(shards, "part-c.parquet"), "wb") as f:
        f.write(b"not parquet")
    for t in plan.full_trials:  # every full-image trial finished
        fs.write_json(fs.join(trial_dir(plan.out_dir, t), "result.json"), {})
    fs.write_json(fs.join(trial_dir(plan.out_dir, plan.subset_trials[0]), "result.json"), {})
    finished = Finished.of(plan)
    assert finished.stored == {(train_job.source.tag, train_job.tag, "train"): 6}
    assert finished.trials == {t.name for t in (*plan.full_trials, plan.subset_trials[0])}
    assert finished.describe(plan) == (f"resuming {plan.out_dir}: 6 of 20 selected images stored, 5 of 10 trials finished; "
                                       "the ETA is for what is left")
    rates = dict(forward_rates={"digits_cnn": 136.0}, train_rates=16.0, select_workers=1, trial_concurrency=2, epochs=2)
    fresh, resumed = plan_cost(plan, **rates), plan_cost(plan, **rates, finished=finished)
    # the train job: 2 of 8 images left, at 1 s an image (test_plan_cost_of_a_small_plan), in the pass's 10-s start
    assert [c.n_images for c in resumed.selections] == [2, 4, 4, 4] and resumed.selections[0].eta_seconds == 2.0
    assert resumed.selection_seconds == 2.0 + 4.0 + 8.0 + 4.0 + 10.0
    # no full-image row; 5 of 6 subset trials in 3 waves of 2
    assert [(t.stage, t.trials, t.eta_seconds) for t in resumed.trainings] == [("subsets", 5, 6.0)]
    assert fresh.eta_seconds - resumed.eta_seconds == 6.0 + 4.0


def _cost(plan, knobs=None, workers=2, scale=1.0):
    return plan_cost(plan, forward_rates={"digits_cnn": 1000.0 * scale, "tv:resnet18": 500.0 * scale}, train_rates=100.0 * scale,
                     select_workers=workers, trial_concurrency=2, epochs=2, select_batch=3, **({"knobs": knobs} if knobs else {}))


def _same(a, b):
    assert [c.label for c in a.selections] == [c.label for c in b.selections]
    assert [(t.label, t.trials) for t in a.trainings] == [(t.label, t.trials) for t in b.trainings]
    assert a.eta_seconds == pytest.approx(b.eta_seconds, rel=1e-12) and a.forward_passes == b.forward_passes


def test_repricing_the_rows_equals_planning_the_run_again():
    """The guard's alternatives come from the CostPlan alone; each equals the cost of the Plan the
    pipeline would build with that setting (rates scaled by the pixels at another image size)."""
    changes = dict(selectors=("backselect", "ig", "captum:Saliency"), pixels_per_step=2, exact_tail=0.5, fills=("mean", "road"))
    cfg, plan = _small_plan(side=8, **changes)
    cost = _cost(plan, knobs_of(cfg, plan, RESOURCES))
    _same(reprice(cost, selector="bgsis"), _cost(_small_plan(side=8, **{**changes, "selectors": ("bgsis",)})[1]))
    _same(reprice(cost, pixels_per_step=16), _cost(_small_plan(side=8, **{**changes, "pixels_per_step": 16})[1]))
    _same(reprice(cost, max_workers=8), _cost(plan, workers=8))
    cfg, plan = _small_plan(side=16, dataset="imagefolder", image_size=16)
    _same(reprice(_cost(plan, knobs_of(cfg, plan, RESOURCES)), image_size=8), _cost(_small_plan(side=8)[1], scale=4.0))
    opts = dict(max_images=9, pixels_per_step=4, exact_tail=0.05)
    stream, plan = _stream_plan(32, {"train": 9, "test": 7}, **opts)
    cost = _cost(plan, knobs_of(stream, plan, RESOURCES))
    _same(reprice(cost, max_images=4), _cost(_stream_plan(32, {"train": 4, "test": 4}, **opts)[1]))
    _same(reprice(cost, image_size=16), _cost(_stream_plan(16, {"train": 9, "test": 7}, **opts)[1], scale=4.0))


def test_knobs_offer_what_the_run_can_change():
    cfg, plan = _small_plan()
    k = knobs_of(cfg, plan, RESOURCES)
    assert (k.selectors, k.pixels_per_step, k.image_size, k.max_workers, k.max_images) == (("backselect",), 1, None, 2, None)
    cfg, plan = _small_plan(selectors=("backselect", "ig"), selector_options={"ig": {"n_steps": 8}})
    assert knobs_of(cfg, plan, RESOURCES).selectors == ()  # --selector bgsis would leave --selector-options naming ig
    cfg, plan = _small_plan(side=16, dataset="imagefolder", image_size=16)
    assert (knobs_of(cfg, plan, RESOURCES).image_size, knobs_of(cfg, plan, RESOURCES).min_image_size) == (16, 8)
    stream, plan = _stream_plan(32, {"train": 5, "test": 9})
    k = knobs_of(stream, plan, RESOURCES)
    assert (k.selectors, k.pixels_per_step, k.image_size, k.min_image_size, k.max_images) == (("bgsis",), 100, 32, 8, 9)


def _no_work(out):
    assert not os.path.exists(out), os.listdir(out)  # nothing selected, trained, locked or logged


@pytest.mark.parametrize("kind", ["digits", "cifar10", "imagefolder"])
def test_dry_run_prints_the_plan_and_does_no_work(kind, ray_session, tmp_path, capsys):
    from overinterp.synthetic import write_cifar, write_imagefolder

    out = str(tmp_path / "out")
    argv = ["run", "--dry-run", "--out", out]
    if kind == "cifar10":
        write_cifar(str(tmp_path / "c"), n_train=20, n_test=10)
        argv += ["--dataset", "cifar10", "--data-root", str(tmp_path / "c"), "--models", "resnet20", "--max-hours", "0"]
    elif kind == "imagefolder":
        write_imagefolder(str(tmp_path / "f"), n_per_class=2, num_classes=2, size=20)
        argv += ["--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--image-size", "16", "--models", "resnet20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "resources (" in printed and "dry run: nothing selected" in printed
    hw = {"digits": 64, "cifar10": 1024, "imagefolder": 256}[kind]
    exact = f"{hw * (hw + 1) // 2:,} passes"  # exact backward selection per image
    assert "backselect train" in printed and exact in printed and "total      ≈" in printed
    _no_work(out)


def test_budget_guard_refuses_exact_bs_on_224px_folders_before_any_work(ray_session, tmp_path, capsys):
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "f"), n_per_class=2, num_classes=2, size=40)
    out = str(tmp_path / "out")
    code = main(["run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--image-size", "224", "--selectors", "backselect",
                 "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "(> --max-hours 24): try --selector bgsis (≈" in err and "--image-size 32 (≈" in err and "--max-hours 0 turns this guard off" in err
    _no_work(out)


def test_smoke_on_a_folder_stays_within_the_stated_passes(ray_session, tmp_path, monkeypatch):
    """--smoke on a folder of 40-px images: every selector's stored passes per image stay within the
    bound --help states (the smoke's full-image models trained and explained as a run does; the
    subset models, which do not change the passes, are not trained)."""
    from overinterp import store
    from overinterp.cli import build_parser, config_from_args
    from overinterp.pipeline.driver import prepare
    from overinterp.pipeline.memory import InMemoryBackend
    from overinterp.synthetic import write_imagefolder

    parser = build_parser()
    assert f"{SMOKE_MAX_PASSES:,} forward passes per image" in " ".join(parser._subparsers._group_actions[0].choices["run"].format_help().split())
    write_imagefolder(str(tmp_path / "f"), n_per_class=3, num_classes=2, size=40)
    out = tmp_path / "out"
    args = parser.parse_args(["run", "--smoke", "--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--seeds", "0",
                              "--input-dropout", "0", "--fill", "mean", "--out", str(out)])
    cfg, data, plan, resources = prepare(config_from_args(args))
    backend = InMemoryBackend(cfg, plan, data, resources)
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # as a run sets it: Tune's handler would outlive the test
    backend.train_full(list(plan.full_trials))
    tags = set()
    jobs = [job for job in plan.selections if job.split == "test"]
    backend.select(jobs)
    for job in jobs:
        sel = store.read_selections(str(out / "selections"), job.source.tag, job.tag, "test")
        assert sel.forward_passes.max() <= SMOKE_MAX_PASSES, (job.tag, sel.forward_passes.max())
        assert sel.curve.shape[1] == 16 * 16  # the folder cut to the smoke's 16 px
        assert len(sel.forward_passes) == plan.n_images["test"]
        tags.add(job.tag)
    assert {"backselect-k8-keep0.05", "gradient"} <= tags, tags  # k raised from 1 to keep exact BS (32,896 passes at 16²) in bounds


def test_dry_run_on_an_out_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    """config.json records the settings an --out was made with: a dry run (or a real one) with other
    settings is refused in one line before data, Ray or calibration, and the file stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"dataset": "digits", "fraction": 0.5}')
    before = (out / "config.json").read_bytes()
    code = main(["run", "--dry-run", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "holds a run with other settings (" in err and "fraction" in err and "use a new --out directory" in err
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_bytes() == before


NO_RAY = r'''
import json, sys
import ray
from overinterp.cli import main
from overinterp.pipeline import resources
from overinterp.synthetic import write_encoded_parquet

root, out = sys.argv[1], sys.argv[2]
write_encoded_parquet(f"{root}/train.parquet", n=12, size=16)
write_encoded_parquet(f"{root}/val.parquet", n=6, size=16, seed=1)
run = ["run", "--dataset", "parquet", "--data-root", root, "--image-size", "16", "--models", "resnet20", "--out", out]
codes = [main([*run, "--dry-run"]), main([*run, "--selectors", "backselect", "--max-hours", "1e-9"])]
# a GPU machine (H100), as the local Ray would find it: its rates scaled from the driver's CPU
resources.local_capacity = lambda: resources.Capacity((resources.NodeType("local", 8, 1, 1, "H100"),), "a GPU machine")
codes.append(main([*run, "--dry-run"]))
print(json.dumps({"codes": codes, "ray": ray.is_initialized()}))
'''


def test_a_dry_run_and_a_refused_plan_start_no_ray(tmp_path):
    """The plan of a streamed Parquet run, printed by --dry-run or refused by the budget guard,
    starts no Ray (a node an autoscaler would add) and runs no task: counts from the footers, rates
    calibrated on the driver's CPU (a GPU run: scaled by device_rates), each rate's source printed.
    In a fresh process: the session's Ray would hide a start."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", NO_RAY, str(tmp_path), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 2, 0], "ray": False}, p.stdout[-3000:]
    assert p.stdout.count("resources (this machine; its Ray starts once the plan is accepted: local 1×{CPU") == 2
    assert p.stdout.count("12 train + 6 test images") == 3
    assert p.stdout.count("  rates      resnet20: calibrated on the driver's CPU (1 thread)") == 2  # the refused plan too
    assert "  rates      resnet20: the driver's CPU × " in p.stdout and "resnet20's H100 and CPU rows" in p.stdout
    assert "GPU actor(s) on H100" in p.stdout
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("overinterp: error: the plan needs ≈ ") and "try --selector bgsis (≈" in err, p.stderr[-3000:]
    _no_work(str(out))


def test_a_streamed_ddp_trial_is_priced_with_its_worker_groups_start():
    """A one-worker streamed trial trains in its own process; one of --workers-per-trial > 1 also starts a
    Ray Train worker group: 13 s more per trial (STREAM_DDP_TRIAL_START_S - STREAM_TRIAL_START_S)."""
    from overinterp.costplan import STREAM_DDP_TRIAL_START_S, STREAM_TRIAL_START_S

    _, plan = _stream_plan(16, {"train": 100, "test": 10})
    rates = dict(forward_rates=1000.0, train_rates=100.0, select_workers=1, trial_concurrency=1, epochs=1)
    one, ddp = plan_cost(plan, **rates), plan_cost(plan, **rates, workers_per_trial=2)
    assert [t.trials for t in one.trainings] == [3]  # subsets, random, positions only: one at a time
    assert ddp.eta_seconds - one.eta_seconds == pytest.approx(3 * (STREAM_DDP_TRIAL_START_S - STREAM_TRIAL_START_S))
    assert one.selections == ddp.selections
