"""Meaningful perturbation: finds a known important pixel, batching never changes it, parameters validate."""

import json

import pytest
import torch

from conftest import TinyConvNet
from overinterp.selection.params import PerturbationParams, check_selector_params, selector_tag_params
from overinterp.selection.perturbation import gaussian_blur, meaningful_perturbation, optimise_masks
from test_selection import LinearScore


def one_hot_pixel_model(hw=64, pixel=27, weight=3.0):
    """logits = [3·x_pixel, 0] on a 1-channel image: only `pixel` matters."""
    w = [0.0] * hw
    w[pixel] = weight
    return LinearScore(w)


def test_finds_the_one_pixel_that_matters_and_lowers_p_c():
    pixel = 27  # (3, 3) in an 8x8 image
    model = one_hot_pixel_model(pixel=pixel)
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 3] = 2.0  # score 6: p(class 0) = 0.9975
    res = meaningful_perturbation(model, x)
    assert res.pred.tolist() == [0] and res.confidence.item() == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())
    assert res.order[0, -1].item() == pixel  # the most important pixel is removed last
    assert sorted(res.order[0].tolist()) == list(range(64))
    assert res.curve[0, -2].item() == pytest.approx(res.confidence.item())  # every other pixel is irrelevant
    assert res.curve[0, -1].item() == pytest.approx(0.5)  # all masked: score 0
    # the learned deletion drives p(c) down: the 8x8 mask (identity upsampling) deletes that pixel
    mask, p_final = optimise_masks(model, x, torch.tensor([0]))
    assert mask[0, 0, 3, 3].item() < 0.05 and mask[0, 0, 3, 3] == mask.min()
    assert p_final.item() < 0.9 * res.confidence.item()
    assert res.forward_passes == 300 + 1 + 64


def test_batch_of_16_gives_each_image_its_own_order():
    model = TinyConvNet(channels=2, seed=1).eval()
    images = torch.randn(16, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = meaningful_perturbation(model, images, seed=3)  # the default 300 Adam steps
    for i in (0, 7, 15):
        alone = meaningful_perturbation(model, images[i : i + 1], seed=3)
        assert torch.equal(alone.order[0], batch.order[i])
        assert torch.allclose(alone.curve[0], batch.curve[i])
    for row in batch.order:
        assert sorted(row.tolist()) == list(range(64))
    assert batch.step_sizes == (1,) * 64 and batch.order.dtype == torch.int64 and batch.curve.dtype == torch.float32


def test_seed_changes_only_the_noise():
    model = TinyConvNet(channels=1, seed=2).eval()
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = PerturbationParams(iterations=20)
    a, b = (meaningful_perturbation(model, images, params=params, seed=s) for s in (0, 0))
    assert torch.equal(a.order, b.order)  # reproducible
    target = a.pred
    m0, m1 = (optimise_masks(model, images, target, params, seed=s)[0] for s in (0, 1))
    assert not torch.equal(m0, m1)  # the seed drives the input noise
    quiet = PerturbationParams(iterations=20, noise_std=0.0)
    c, d = (meaningful_perturbation(model, images, params=quiet, seed=s) for s in (0, 1))
    assert torch.equal(c.order, d.order)  # without noise the seed has nothing to change


def test_geometry_scales_with_the_image_side():
    p = PerturbationParams()
    assert p.geometry(224, 224)["mask"] == (28, 28)
    assert p.geometry(224, 224)["sigma"] == pytest.approx((10.0, 10.0))
    assert p.geometry(224, 224)["radius"] == (30, 30)
    assert p.geometry(32, 32)["mask"] == (8, 8)  # 32/8 = 4 is below the floor
    assert p.geometry(8, 8)["mask"] == (8, 8) and p.geometry(4, 4)["mask"] == (4, 4)  # floor capped at the side
    assert p.geometry(8, 8)["sigma"] == (1.0, 1.0)  # σ floor in pixels
    assert p.geometry(299, 299)["mask"] == (37, 37)


def test_blur_keeps_constant_images_and_spreads_a_spike():
    flat = torch.full((1, 3, 5, 7), 0.7, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(flat, (1.5, 1.0), (5, 3)), flat)
    spike = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    spike[0, 0, 4, 4] = 1.0
    out = gaussian_blur(spike, (1.0, 1.0), (3, 3))
    assert out.sum().item() == pytest.approx(1.0) and 0.1 < out[0, 0, 4, 4].item() < 0.2


def test_parameters_validate_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="iterations must be > 0"):
        PerturbationParams(iterations=0)
    with pytest.raises(ValueError, match="iterations must be an int"):
        PerturbationParams(iterations=300.0)
    with pytest.raises(ValueError, match="tv_beta must be >= 1"):
        PerturbationParams(tv_beta=0.5)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        PerturbationParams(noise_std=-0.1)
    with pytest.raises(ValueError, match="l1_coeff must be a number"):
        PerturbationParams(l1_coeff="0.01")
    with pytest.raises(ValueError, match="unknown perturbation parameter.*choose from iterations, lr"):
        PerturbationParams.from_dict({"iters": 10})
    assert PerturbationParams.from_dict({"iterations": 500}).iterations == 500


def test_parameters_record_and_tag():
    assert selector_tag_params("perturbation") == {"it": 300}
    assert selector_tag_params("perturbation", {"iterations": 500, "lr": 0.05}) == {"it": 500, "lr": 0.05}
    record = check_selector_params("perturbation", {"seed": 2})  # the parameters a selection is stored with
    assert json.loads(json.dumps(record)) == record and record["seed"] == 2 and record["tv_beta"] == 3.0
    assert PerturbationParams.from_dict({k: v for k, v in record.items() if k != "seed"}) == PerturbationParams()


def test_bad_input_fails_before_any_forward_pass():
    def forward(x):
        raise AssertionError("the model must not run on invalid input")

    with pytest.raises(ValueError, match="normalised floats"):
        meaningful_perturbation(forward, torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="PerturbationParams"):
        meaningful_perturbation(forward, torch.zeros(1, 1, 4, 4), params={"iterations": 3})
