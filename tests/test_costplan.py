"""costplan: the ETA arithmetic exactly, calibration that never changes a model, the budget guard."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from overinterp.costplan import (
    BACKWARD_COST,
    BudgetExceeded,
    CostPlan,
    alternatives_for,
    calibrate_forward_rate,
    calibrate_train_rate,
    check_budget,
    estimate_selection,
    estimate_training,
    format_duration,
    plan_cost,
)

HOUR = 3600.0


def test_selection_eta_is_the_busiest_workers_share():
    # 4x4 exact BS: 16·17/2 = 136 passes per image. 10 images in batches of 4 = 3 batches on 2
    # workers: one worker selects 2 batches (8 images) -> 8 · 136 / 68 = 16 s
    c = estimate_selection("m", "plain", "backselect", "test", params={"k": 1}, n_images=10, hw=16, rate=68,
                           workers=2, select_batch=4)
    assert (c.forward_per_image, c.backward_per_image, c.workers) == (136, 0, 2)
    assert c.forward_passes == 1360 and c.total_passes == 1360 and c.eta_seconds == 16.0
    # batches cap the workers: 10 images in one batch of 64 run on one worker, whatever is available
    one = estimate_selection("m", "plain", "backselect", "test", params={"k": 1}, n_images=10, hw=16, rate=68, workers=8,
                             select_batch=64)
    assert one.workers == 1 and one.eta_seconds == 10 * 136 / 68
    # no select batch: images spread evenly
    even = estimate_selection("m", "plain", "backselect", "test", n_images=10, hw=16, rate=68, workers=4)
    assert even.workers == 4 and even.eta_seconds == 2.5 * 136 / 68


def test_backward_passes_weigh_in_the_eta():
    c = estimate_selection("tv:resnet50", "pretrained", "bgsis", "val", params={"k": 100}, n_images=1, hw=(299, 299), rate=100,
                           tag="bgsis-k100")
    assert (c.forward_per_image, c.backward_per_image) == (896, 895)
    assert c.eta_seconds == pytest.approx((896 + BACKWARD_COST * 895) / 100) and BACKWARD_COST == 2.0
    assert c.label == "tv:resnet50/pretrained bgsis-k100 val"
    assert "1 img × 896 passes + 895 backward = 896 passes + 895 backward" in c.describe()


def test_training_eta_runs_in_waves():
    t = estimate_training("digits_cnn", "subsets", trials=5, epochs=3, images=100, rate=50, concurrency=2)
    assert t.eta_seconds == 3 * 3 * 100 / 50 and t.total_images == 1500  # ceil(5 / 2) = 3 waves of 6 s
    assert estimate_training("m", "subsets", trials=2, epochs=1, images=10, rate=10, concurrency=8).concurrency == 2


def test_describe_line():
    # 8x8 exact BS = 2,080 passes per image; 360 images on 2 workers at 5,200 img/s = 72 s
    c = estimate_selection("digits_cnn", "plain", "backselect", "test", params={"k": 1}, n_images=360, hw=64, rate=5200, workers=2)
    assert c.describe() == ("selection  digits_cnn/plain backselect test  360 img × 2,080 passes = 748,800 passes  "
                            "≈ 1 min 12 s on 2 workers at 5,200 img/s each")
    t = estimate_training("digits_cnn", "full-image", trials=3, epochs=30, images=1440, rate=1296, concurrency=3)
    assert t.describe() == ("training   digits_cnn full-image  3 trials × 30 epochs × 1,440 img = 129,600 images  "
                            "≈ 33 s on 3 at once at 1,296 img/s each")
    lines = CostPlan((c,), (t,)).describe().splitlines()
    assert lines[1].strip().startswith("training   digits_cnn full-image") and lines[2].strip().startswith("selection")
    assert lines[-1].strip() == "total      ≈ 1 min 45 s (selection 748,800 passes ≈ 1 min 12 s, training ≈ 33 s)"


def test_bad_estimates():
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        estimate_selection("m", "plain", "backselect", "test", n_images=1, hw=16, rate=0)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        estimate_selection("m", "plain", "backselect", "test", n_images=1, hw=16, rate=1, workers=0)
    with pytest.raises(ValueError, match="unknown selector"):
        estimate_selection("m", "plain", "original", "test", n_images=1, hw=16, rate=1)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        estimate_training("m", "subsets", trials=1, epochs=0, images=1, rate=1)


def _small_plan():
    from overinterp.pipeline.plan import plan_small

    from overinterp.config import RunConfig

    cfg = RunConfig(models=("digits_cnn",), seeds=(0, 1), input_dropout=0.2, out_dir="/tmp/x", selectors=("backselect",), fills=("mean",))
    data = SimpleNamespace(shape=(1, 4, 4), labels={"train": [0] * 8, "test": [0] * 4}, num_classes=10)
    return plan_small(cfg, data)


def test_plan_cost_of_a_small_plan():
    plan = _small_plan()
    cost = plan_cost(plan, forward_rates={"digits_cnn": 136.0}, train_rates=16.0, select_workers=1, trial_concurrency=2, epochs=2)
    by_label = {c.label: c.eta_seconds for c in cost.selections}
    # 136 passes per 4x4 image at 136 img/s: 1 s an image; the ensemble of 2 runs at half the rate; each job
    # starts in JOB_START_S (10 s) and each wave of trials in TRIAL_START_S (1 s)
    assert by_label == {"digits_cnn/plain backselect train": 18.0, "digits_cnn/plain backselect test": 14.0,
                        "digits_cnn/ensemble backselect test": 18.0, "digits_cnn/input-dropout backselect test": 14.0}
    # full: 4 trials (2 seeds, plain and input dropout) in 2 waves of 2 epochs × 8 images / 16 img/s;
    # subsets: 6 trials (subset, positions, random per seed) in 3 waves
    assert [(t.stage, t.trials, t.eta_seconds) for t in cost.trainings] == [("full-image", 4, 4.0), ("subsets", 6, 6.0)]
    assert cost.eta_seconds == 64.0 + 10.0 and cost.forward_passes == (8 + 4 + 4 + 4) * 136
    params = cost.as_params()
    assert params["cost.eta_s"] == 74.0 and params["cost.select.digits_cnn.ensemble.backselect.test.eta_s"] == 18.0
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-/]+", k) and isinstance(v, (str, int, float)) for k, v in params.items())
    with pytest.raises(ValueError, match="no forward rate for model 'digits_cnn'"):
        plan_cost(plan, forward_rates={"resnet20": 1.0}, train_rates=1.0, select_workers=1, trial_concurrency=1, epochs=1)


@pytest.mark.parametrize("seconds, text", [
    (0, "< 1 s"), (0.4, "< 1 s"), (42, "42 s"), (59.6, "1 min"), (72, "1 min 12 s"), (120, "2 min"), (313.4, "5 min 13 s"),
    (5 * HOUR, "5 h"), (5 * HOUR + 180, "5 h 3 min"), (19 * HOUR, "19 h"), (3.5 * 24 * HOUR, "3.5 days"),
    (40 * 24 * HOUR, "40 days"), (3.2 * 365.25 * 24 * HOUR, "3.2 years"), (math.inf, "∞"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_refuses_negative():
    with pytest.raises(ValueError, match=">= 0 seconds"):
        format_duration(-1)


def _plan_of(seconds: float) -> CostPlan:
    """A CostPlan whose ETA is exactly `seconds`: one training trial of `seconds` images at 1 img/s."""
    return CostPlan(trainings=(estimate_training("m", "subsets", trials=1, epochs=1, images=int(seconds), rate=1.0),))


def test_budget_guard_names_the_faster_choices():
    alternatives = [
        ("--selector bgsis", _plan_of(5 * HOUR)),
        ("--pixels-per-step 16", _plan_of(30 * HOUR)),  # over budget: the next k is tried
        ("--pixels-per-step 64", _plan_of(19 * HOUR)),  # the first k that fits
        ("--pixels-per-step 256", _plan_of(3 * HOUR)),  # fits too, but 64 is less drastic
        ("--image-size 112", _plan_of(30 * HOUR)),
        ("--image-size 32", _plan_of(2 * HOUR)),
        ("--max-workers 16", _plan_of(200 * HOUR)),  # slower than the plan: left out
    ]
    with pytest.raises(BudgetExceeded) as e:
        check_budget(_plan_of(40 * HOUR), 24, alternatives)
    assert str(e.value) == ("the plan needs ≈ 40 h (> --max-hours 24): try --selector bgsis (≈ 5 h), --pixels-per-step 64 (≈ 19 h), "
                            "--image-size 32 (≈ 2 h); --max-hours 0 turns this guard off")
    assert isinstance(e.value, ValueError)
    # nothing fits: each flag's fastest is still named
    with pytest.raises(BudgetExceeded, match=r"try --max-workers 16 \(≈ 30 h\), --image-size 32 \(≈ 26 h\);"):
        check_budget(_plan_of(100 * HOUR), 24, [("--max-workers 16", _plan_of(30 * HOUR)), ("--image-size 112", _plan_of(50 * HOUR)),
                                               ("--image-size 32", _plan_of(26 * HOUR))])
    with pytest.raises(BudgetExceeded, match=r"^the plan needs ≈ 40 h \(> --max-hours 24\); --max-hours 0"):
        check_budget(_plan_of(40 * HOUR), 24)


def test_budget_guard_passes():
    check_budget(_plan_of(100 * HOUR), 0)  # 0: off
    check_budget(_plan_of(24 * HOUR), 24)  # exactly the budget fits
    check_budget(_plan_of(1), 0.001)
    with pytest.raises(ValueError, match="--max-hours must be a number >= 0"):
        check_budget(_plan_of(1), -1)


def test_alternatives_for_tries_the_standard_settings():
    asked = []

    def reestimate(overrides):
        asked.append(overrides)
        return None if overrides == {"pixels_per_step": 256} else _plan_of(len(asked))

    current = {"selector": "backselect", "pixels_per_step": 16, "image_size": 224, "max_workers": 4}
    labels = [label for label, _ in alternatives_for(reestimate, current)]
    assert labels == ["--selector bgsis", "--pixels-per-step 64", "--image-size 112", "--image-size 32", "--max-workers 16"]
    assert {"pixels_per_step": 256} in asked  # asked, not applicable, skipped
    # a fixed-size data set on bgsis at k = 256 with no --max-workers: nothing to try
    assert alternatives_for(reestimate, {"selector": "bgsis", "pixels_per_step": 256, "image_size": None}) == []
    assert [l for l, _ in alternatives_for(reestimate, {"image_size": 48})] == ["--image-size 32", "--image-size 24"]
    # sis_imagenet.py's pilot: a half, a tenth, ... of the images, never 0 nor all of them
    assert [l for l, _ in alternatives_for(reestimate, {"max_images": 1281})] == ["--max-images 640", "--max-images 128", "--max-images 12",
                                                                                  "--max-images 1"]
    assert [l for l, _ in alternatives_for(reestimate, {"max_images": 3})] == ["--max-images 1"]


def test_the_guard_on_real_estimates():
    """alternatives_for + check_budget on estimates of exact BS over 64x64 images."""

    def reestimate(o):
        side = o.get("image_size", 64)
        sel = estimate_selection("m", "plain", o.get("selector", "backselect"), "test", params={"k": o.get("pixels_per_step", 1)},
                                 n_images=1000, hw=side * side, rate=1000.0, workers=o.get("max_workers", 1))
        return CostPlan((sel,))

    current = {"selector": "backselect", "pixels_per_step": 1, "image_size": 64, "max_workers": 1}
    plan = reestimate({})
    assert plan.eta_seconds == 4096 * 4097 // 2  # 1,000 images at 1,000 img/s: 97 days
    alts = dict(alternatives_for(reestimate, current))
    with pytest.raises(BudgetExceeded) as e:
        check_budget(plan, 24, list(alts.items()))
    msg = str(e.value)
    assert msg.startswith(f"the plan needs ≈ {format_duration(plan.eta_seconds)} (> --max-hours 24): try --selector bgsis (≈ ")
    for label in ("--selector bgsis", "--pixels-per-step 256", "--image-size 32", "--max-workers 4"):
        assert f"{label} (≈ {format_duration(alts[label].eta_seconds)})" in msg
    # k = 16 (6.1 days) and 64 (37 h) do not fit, 256 does (9 h 41 min); 32 px still needs 6.1 days
    assert "--pixels-per-step 16 " not in msg and "--pixels-per-step 64 " not in msg
    assert "--pixels-per-step 256 (≈ 9 h 41 min)" in msg and "--image-size 32 (≈ 6.1 days)" in msg


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 8 * 8, 3))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forward_calibration_leaves_the_model_alone():
    model = _tiny().train()  # train mode: a forward would move the BatchNorm statistics
    before = _snapshot(model)
    rate = calibrate_forward_rate(model, (1, 8, 8), "cpu", batch=16, seconds=0.05)
    assert rate > 0 and math.isfinite(rate)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model[0].weight.is_contiguous()  # no channels_last conversion of the caller's model
    assert calibrate_forward_rate(lambda x: x.flatten(1)[:, :3], (1, 8, 8), "cpu", batch=4, seconds=0.01) > 0  # any callable
    with pytest.raises(ValueError, match="CUDA only"):
        calibrate_forward_rate(model, (1, 8, 8), "cpu", batch=4, autocast="bf16", seconds=0.01)
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        calibrate_forward_rate(model, (8, 8), "cpu", batch=4)


@pytest.mark.parametrize("training", [True, False])
def test_train_calibration_restores_the_model(training):
    model = _tiny().train(training)
    model[0].bias.grad = torch.full_like(model[0].bias, 7.0)  # a gradient the caller had
    before = _snapshot(model)
    rng = torch.get_rng_state()
    rate = calibrate_train_rate(model, (1, 8, 8), 3, "cpu", batch=8, seconds=0.05)
    assert rate > 0 and math.isfinite(rate)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert torch.equal(model[0].bias.grad, torch.full_like(model[0].bias, 7.0)) and model[0].weight.grad is None
    assert model.training is training and torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        calibrate_train_rate(model, (1, 8, 8), 1, "cpu", batch=8)
