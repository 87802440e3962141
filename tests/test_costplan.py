"""costplan: the ETA arithmetic exactly, calibration that never changes a model, the budget guard."""

import math

import pytest
import torch
import torch.nn as nn

from overinterp.costplan import (
    BACKWARD_COST,
    BudgetExceeded,
    CostPlan,
    Knobs,
    alternatives_for,
    calibrate_forward_rate,
    calibrate_train_rate,
    check_budget,
    estimate_selection,
    estimate_training,
    format_duration,
    reprice,
)

HOUR = 3600.0


def test_selection_eta_is_the_busiest_workers_share():
    # 4x4 exact BS: 16·17/2 = 136 passes per image. 10 images in batches of 4 = 3 batches on 2
    # workers: one worker selects 2 batches (8 images) -> 8 · 136 / 68 = 16 s
    c = estimate_selection("m", "plain", "backselect", "test", params={"k": 1}, n_images=10, hw=16, rate=68,
                           workers=2, select_batch=4)
    assert (c.forward_per_image, c.backward_per_image, c.workers) == (136, 0, 2)
    assert c.forward_passes == 1360 and c.backward_passes == 0 and c.eta_seconds == 16.0
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


def test_a_streamed_runs_per_image_costs_add_to_the_passes():
    """image_s: a worker's (a trial's) seconds per image beside the model, kept when repriced."""
    c = estimate_selection("m", "pretrained", "backselect", "train", params={"k": 1}, n_images=10, hw=16, rate=68, workers=2,
                           start_s=8.0, image_s=0.5)
    assert c.eta_seconds == 8.0 + 5 * (136 / 68 + 0.5)  # 5 images on the busiest worker
    assert c.repriced(n_images=20).eta_seconds == 8.0 + 10 * (136 / 68 + 0.5)
    assert c.describe().endswith("at 68 img/s each + 5e+02 ms/img streaming")
    t = estimate_training("m", "subsets", trials=3, epochs=2, images=100, rate=50, start_s=15.0, image_s=0.01)
    assert t.eta_seconds == pytest.approx(3 * (15.0 + 2 * 100 * (1 / 50 + 0.01)))
    assert t.repriced(images=10).eta_seconds == pytest.approx(3 * (15.0 + 2 * 10 * (1 / 50 + 0.01)))
    assert t.describe().endswith("+ 10 ms/img streaming, 15 s start per trial")
    plan = CostPlan((c,), (t,), fixed_s=30.0)
    assert plan.eta_seconds == pytest.approx(c.eta_seconds + t.eta_seconds + 30.0)
    assert "  start and summary  ≈ 30 s (" in plan.describe()
    assert "start and summary" not in CostPlan((c,), (t,)).describe()


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
    # where each model's rates came from: printed first, logged, and kept by the guard's repricing
    sourced = CostPlan((c,), (t,), Knobs(max_workers=2), rate_sources=(("digits_cnn", "calibrated on the driver's CPU"),))
    assert sourced.describe().splitlines()[1] == "  rates      digits_cnn: calibrated on the driver's CPU"
    assert sourced.as_params()["cost.rates.digits_cnn"] == "calibrated on the driver's CPU"
    assert reprice(sourced, max_workers=8).rate_sources == sourced.rate_sources


def test_bad_estimates():
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        estimate_selection("m", "plain", "backselect", "test", n_images=1, hw=16, rate=0)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        estimate_selection("m", "plain", "backselect", "test", n_images=1, hw=16, rate=1, workers=0)
    with pytest.raises(ValueError, match="unknown selector"):
        estimate_selection("m", "plain", "original", "test", n_images=1, hw=16, rate=1)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        estimate_training("m", "subsets", trials=1, epochs=0, images=1, rate=1)


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


def _row(selector="backselect", k=1, variant="plain", split="test", side=8, n=10, rate=100.0, workers=1, **kw):
    params = {"k": k} if selector in ("backselect", "bgsis") else {}
    return estimate_selection("m", variant, selector, split, params=params, n_images=n, hw=(side, side), rate=rate, workers=workers,
                              **kw)


def test_alternatives_follow_the_knobs():
    plan = CostPlan((_row(),), knobs=Knobs(selectors=("backselect",), pixels_per_step=16, image_size=224, min_image_size=8, max_workers=4))
    assert [label for label, _ in alternatives_for(plan)] == ["--selector bgsis", "--pixels-per-step 64", "--pixels-per-step 256",
                                                              "--image-size 112", "--image-size 32", "--max-workers 16"]
    # nothing applies: bgsis alone at k = 256, a fixed image size, no knobs given
    assert alternatives_for(CostPlan((_row("bgsis", 256),), knobs=Knobs(selectors=("bgsis",), pixels_per_step=256))) == []
    assert alternatives_for(CostPlan((_row(),))) == []
    sizes = lambda side, least: [l for l, _ in alternatives_for(CostPlan((_row(side=side),), knobs=Knobs(image_size=side, min_image_size=least)))]
    assert sizes(48, 1) == ["--image-size 32", "--image-size 24"]
    assert sizes(16, 16) == [] and sizes(16, 8) == ["--image-size 8"]  # never below what the config accepts
    # sis_imagenet.py's pilot: a half, a tenth, ... of the images, never 0 nor all of them
    pilots = lambda n: [l for l, _ in alternatives_for(CostPlan((_row(n=n),), knobs=Knobs(max_images=n)))]
    assert pilots(1281) == ["--max-images 640", "--max-images 128", "--max-images 12", "--max-images 1"]
    assert pilots(3) == ["--max-images 1"]
    # more selection actors only where the cluster can hold them: none on a machine already full
    workers = lambda n, slots: [l for l, _ in alternatives_for(CostPlan((_row(),), knobs=Knobs(max_workers=n, worker_slots=slots)))]
    assert workers(2, 2) == [] and workers(2, 5) == ["--max-workers 5"] and workers(2, 64) == ["--max-workers 8"]
    assert workers(2, None) == ["--max-workers 8"]  # no bound known


def test_reprice_pixels_per_step_changes_the_removal_selectors_only():
    plan = CostPlan((_row("backselect", 1), _row("ig")), knobs=Knobs(pixels_per_step=1))
    bs, ig = reprice(plan, pixels_per_step=4).selections
    # 8x8 at k = 4: 16 steps over 64, 60, ..., 4 remaining = 544 candidates + 16 re-scores
    assert (bs.params, bs.tag, bs.forward_per_image) == ({"k": 4}, "backselect-k4", 544 + 16)
    assert ig == plan.selections[1] and reprice(plan, pixels_per_step=4).knobs.pixels_per_step == 4


def test_reprice_selector_runs_it_once_per_model_variant_and_split():
    rows = (_row("backselect", variant="plain", split="train"), _row("backselect", variant="plain"),
            _row("backselect", variant="ensemble"), _row("ig", variant="plain", split="train"), _row("ig", variant="plain"))
    # subsets stage: 2 seeds × 3 selections (backselect, ig and a captum class without a row) × (2 fills + positions)
    # = 18 trials, plus 2 seeds × 2 fills on the random baseline
    train = estimate_training("m", "subsets", trials=22, epochs=1, images=10, rate=10.0, concurrency=2, selections=3, per_selection=6)
    full = estimate_training("m", "full-image", trials=2, epochs=1, images=10, rate=10.0, concurrency=2)
    plan = CostPlan(rows, (full, train), Knobs(selectors=("backselect", "ig", "captum:Saliency"), pixels_per_step=16, exact_tail=0.5))
    alt = reprice(plan, selector="bgsis")
    assert [(c.variant, c.split, c.tag) for c in alt.selections] == [("plain", "train", "bgsis-k16-tail0.5"), ("plain", "test", "bgsis-k16-tail0.5"),
                                                                      ("ensemble", "test", "bgsis-k16-tail0.5")]
    assert alt.selections[0].params == {"k": 16, "tail": 0.5}
    assert [(t.trials, t.selections) for t in alt.trainings] == [(2, 0), (22 - 2 * 6, 1)]
    assert alt.trainings[1].eta_seconds == 5 * 1.0  # 10 trials, 2 at once: 5 waves of 10 images at 10 img/s
    assert alt.knobs.selectors == ("bgsis",) and alternatives_for(alt)[0][0] != "--selector bgsis"


def test_reprice_image_size_scales_the_rates_by_the_pixels():
    train = estimate_training("m", "subsets", trials=1, epochs=1, images=100, rate=10.0)
    plan = CostPlan((_row(side=64, rate=100.0),), (train,), Knobs(image_size=64))
    alt = reprice(plan, image_size=32)
    (sel,), (t,) = alt.selections, alt.trainings
    assert sel.size == (32, 32) and sel.rate == 400.0 and t.rate == 40.0 and t.eta_seconds == 2.5
    assert sel.forward_per_image == 1024 * 1025 // 2 and alt.knobs.image_size == 32
    with pytest.raises(ValueError, match="fixed image size"):
        reprice(CostPlan((_row(),)), image_size=4)
    # a setting that cannot apply is not offered: an occlusion window of 5 does not fit 4 px images
    occ = estimate_selection("m", "plain", "occlusion", "test", params={"window": 5}, n_images=1, hw=(8, 8), rate=1.0)
    assert [l for l, _ in alternatives_for(CostPlan((occ,), knobs=Knobs(image_size=8)))] == []


def test_reprice_workers_and_images():
    train = estimate_training("m", "subsets", trials=1, epochs=1, images=100, rate=10.0)
    plan = CostPlan((_row(n=100, select_batch=10, workers=2),), (train,), Knobs(max_workers=2, max_images=100))
    assert plan.selections[0].workers == 2
    more = reprice(plan, max_workers=8).selections[0]
    assert (more.workers, more.max_workers) == (8, 8) and more.eta_seconds == 20 * 2080 / 100  # 2 batches of 10 on the busiest
    pilot = reprice(plan, max_images=10)
    assert pilot.selections[0].n_images == 10 and pilot.selections[0].workers == 1 and pilot.trainings[0].images == 10


def test_the_guard_on_real_estimates():
    """check_budget lists the alternatives it prices itself: exact BS over 64x64 images."""
    plan = CostPlan((estimate_selection("m", "plain", "backselect", "test", params={"k": 1}, n_images=1000, hw=(64, 64), rate=1000.0),),
                    knobs=Knobs(selectors=("backselect",), pixels_per_step=1, image_size=64, max_workers=1))
    assert plan.eta_seconds == 4096 * 4097 // 2  # 1,000 images at 1,000 img/s: 97 days
    alts = dict(alternatives_for(plan))
    with pytest.raises(BudgetExceeded) as e:
        check_budget(plan, 24)
    msg = str(e.value)
    assert msg.startswith(f"the plan needs ≈ {format_duration(plan.eta_seconds)} (> --max-hours 24): try --selector bgsis (≈ ")
    for label in ("--selector bgsis", "--pixels-per-step 256", "--image-size 32", "--max-workers 4"):
        assert f"{label} (≈ {format_duration(alts[label].eta_seconds)})" in msg
    # k = 16 (6.1 days) and 64 (37 h) do not fit, 256 does (9 h 41 min); 32 px: 524,800 passes at 4,000 img/s
    assert "--pixels-per-step 16 " not in msg and "--pixels-per-step 64 " not in msg
    assert "--pixels-per-step 256 (≈ 9 h 41 min)" in msg and "--image-size 32 (≈ 36 h)" in msg
    assert alts["--image-size 32"].eta_seconds == 1000 * (1024 * 1025 // 2) / 4000


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
