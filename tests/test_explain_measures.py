"""overinterp/explain/measures.py: success, distance and transfer counted by hand on hand-built
models, the PGD baseline against a classifier whose answer is known (and against torchattacks,
where installed), the Fréchet distance's closed forms and a scipy twin, and the discriminator at
its two ends (same distribution, obviously different ones)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from overinterp.explain.measures import (
    PGDConfig, discriminator_accuracy, distance, frechet_distance, penultimate_features, pgd_at_success_rate,
    pgd_counterfactual, pgd_float, target_probability, transfer, vce_success,
)
from overinterp.data import normalize
from overinterp.models import create_model

torch.set_num_threads(1)

MEAN, STD = (0.5,), (0.5,)


class Brightness(torch.nn.Module):
    """logits k·(-m, m), m the mean normalised pixel: class 1 = bright. p₁ = sigmoid(2k·m)."""

    def __init__(self, k=10.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k), requires_grad=False)

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return self.k * torch.stack([-m, m], 1)


def grey(levels):
    """uint8 (len(levels), 1, 8, 8) flat images."""
    return torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()


def test_success_and_distance_by_hand():
    images = grey([255, 140, 0])  # normalised means 1, 0.098, -1
    p = target_probability(Brightness(), images, torch.tensor([1, 1, 0]), MEAN, STD)
    expect = [1 / (1 + math.exp(-20)), 1 / (1 + math.exp(-20 * (140 / 127.5 - 1))), 1 / (1 + math.exp(-20))]
    assert torch.allclose(p, torch.tensor(expect, dtype=torch.float64), atol=1e-6)
    assert vce_success(Brightness(), images, torch.tensor([1, 1, 0]), MEAN, STD).tolist() == [True, False, True]  # 0.88 < 0.9
    d = distance(grey([255]), grey([0]), MEAN, STD, "l2")  # 64 pixels, each 2 normalised units apart
    assert torch.allclose(d, torch.tensor([16.0])) and torch.allclose(distance(grey([255]), grey([0]), MEAN, STD, "l1"), torch.tensor([128.0]))


def test_transfer_counts_by_hand():
    images = grey([255, 255, 255, 0])  # model B (Brightness) predicts 1, 1, 1, 0
    out = transfer(torch.tensor([True, True, False, True]), Brightness(), images, torch.tensor([1, 0, 1, 1]), MEAN, STD)
    assert out == {"succeeded_a": 3, "transferred": 1, "rate": 1 / 3}  # image 0 transfers; 1 and 3 do not; 2 did not succeed on A
    assert math.isnan(transfer(torch.zeros(4, dtype=torch.bool), Brightness(), images, torch.zeros(4, dtype=torch.long), MEAN, STD)["rate"])


@pytest.mark.parametrize("norm,eps", [("l2", 4.0), ("linf", 0.5)])
def test_pgd_reaches_the_target_within_its_ball(norm, eps):
    images = grey([40, 60, 80])  # dark: class 0 with p ≈ 1
    targets = torch.ones(3, dtype=torch.long)
    adv = pgd_counterfactual(Brightness(), images, targets, MEAN, STD, PGDConfig(norm=norm, eps=eps, steps=20))
    assert vce_success(Brightness(), adv, targets, MEAN, STD).all()
    delta = (adv.float() - images.float()).flatten(1) / 255
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(1).values
    assert (size <= eps + 1 / 255 * (8 if norm == "l2" else 1)).all()  # the ball, plus uint8 rounding (≤ 0.5/255 per pixel)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_is_step_for_step_torchattacks(norm):
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    targets = torch.tensor([3, 1, 4, 1])
    cfg = PGDConfig(norm=norm, eps=1.0 if norm == "l2" else 0.1, steps=5)
    cls = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD
    atk = cls(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, random_start=False)
    atk.set_normalization_used(mean=list(MEAN), std=list(STD))  # torchattacks then takes and returns normalised images
    atk.set_mode_targeted_by_label(quiet=True)
    ref = atk(normalize(images, MEAN, STD), targets) * STD[0] + MEAN[0]  # back to [0, 1] pixels
    ours = pgd_float(model, images, targets, MEAN, STD, cfg)
    assert (ours - images.float() / 255).abs().max() > 0.05 and torch.allclose(ours, ref, atol=1e-5)


def test_pgd_at_success_rate_takes_the_smallest_radius_that_reaches_the_rate():
    images, targets = grey([40, 60, 80]), torch.ones(3, dtype=torch.long)
    out = pgd_at_success_rate(Brightness(), images, targets, MEAN, STD, rate=1.0, radii=[0.5, 2.0, 4.0, 8.0], norm="l2")
    below = pgd_counterfactual(Brightness(), images, targets, MEAN, STD, PGDConfig(norm="l2", eps=2.0))
    assert out["eps"] == 4.0 and out["rate"] == 1.0 and not vce_success(Brightness(), below, targets, MEAN, STD).all()


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_mean_shift_adds_its_square():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)  # ‖shift‖² = 14.25
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, a + shift) == pytest.approx(14.25, abs=1e-8)  # same covariance: only the means differ


def test_frechet_distance_agrees_with_fids_scipy_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = 1.5 * torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = (np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
           - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real))
    assert ref > 1 and frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_penultimate_features_are_the_last_linear_layers_input():
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1).eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expect = model.pool(F.relu(model.conv2(F.relu(model.conv1(x))))).flatten(1)
    assert torch.allclose(penultimate_features(model, images, MEAN, STD), expect.double(), atol=1e-6)


def test_discriminator_is_at_chance_on_one_distribution_and_perfect_on_two_different_ones():
    g = torch.Generator().manual_seed(0)
    noise = lambda n, level: (level + 40 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 255).round().to(torch.uint8)  # noqa: E731
    same = discriminator_accuracy(noise(400, 128), noise(400, 128), (0.5,), (0.16,), epochs=10)
    different = discriminator_accuracy(noise(400, 60), noise(400, 190), (0.5,), (0.16,), epochs=10)
    # 400 test images: chance has sd 0.025, so 0.5 ± 0.1 is 4 sd wide
    assert abs(same - 0.5) < 0.1 and different > 0.98, (same, different)
