"""overinterp/explain/objectives.py, pixels.py and guided.py: the objectives' values by hand, the
pixel spaces, gradient checkpointing, and both guidance methods reaching a target class against a
hand-built classifier whose answer is known. The prior in most tests is the exact denoiser of
Gaussian data (no training, a smooth known DDIM map); a tiny random UNet where the network matters."""

import math

import pytest
import torch

pytest.importorskip("diffusers")  # the `explain` extra
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

from overinterp.data import normalize  # noqa: E402
from denoisers import GaussianOptimal  # noqa: E402
from overinterp.explain.ddim import Denoiser, ddim_chain, initial_noise, schedule  # noqa: E402
from overinterp.explain.guided import METHODS, GuidanceConfig, generate  # noqa: E402
from overinterp.explain.objectives import VCE, ClassVisualisation, Disagreement, distance  # noqa: E402
from overinterp.explain.pixels import (  # noqa: E402
    classifier_to_diffusion, diffusion_to_classifier, diffusion_to_uint8, uint8_to_classifier, uint8_to_diffusion,
)

torch.set_num_threads(1)

MEAN, STD = (0.5,), (0.5,)  # normalised units == diffusion units: the hand-built classifier reads either


class Brightness(torch.nn.Module):
    """Class 1 "bright", class 0 "dark": logits k·(-m, m), m the mean normalised pixel. p₁ ≥ 0.9 iff m ≥ ln 9 / 2k."""

    def __init__(self, k=10.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k), requires_grad=False)  # a parameter: models have a device

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return self.k * torch.stack([-m, m], 1)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def gaussian_prior():
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, beta_schedule="squaredcos_cap_v2")
    return Denoiser(GaussianOptimal(sched.alphas_cumprod), sched, (1, 8, 8))


def dark_images(n=3):
    """uint8 (n, 1, 8, 8) dim noise around grey level 70 (normalised mean ≈ -0.45): class 0 with p ≈ 1."""
    g = torch.Generator().manual_seed(5)
    return (70 + 30 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 255).round().to(torch.uint8)


def p_bright(images_uint8):
    with torch.no_grad():
        return torch.softmax(Brightness()(uint8_to_classifier(images_uint8, MEAN, STD)), 1)[:, 1]


# --- objectives and pixel spaces ---------------------------------------------------------------

def test_disagreement_is_minus_p1_plus_p2_by_hand():
    a, b = FixedLogits([math.log(3.0), 0.0]), FixedLogits([0.0, math.log(3.0)])  # p_a(0) = 0.75, p_b(0) = 0.25
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(Disagreement(a, b, 0)(x), torch.tensor([-0.5, -0.5]))
    assert torch.allclose(Disagreement(b, a, 0)(x), torch.tensor([0.5, 0.5]))  # the other direction: swap the models
    assert torch.allclose(Disagreement(a, b, torch.tensor([0, 1]))(x), torch.tensor([-0.5, 0.5]))  # per-image targets


def test_vce_and_class_visualisation_by_hand():
    model = FixedLogits([0.0, math.log(3.0)])  # p(1) = 0.75
    start = torch.zeros(1, 1, 8, 8)
    x = start.clone()
    x[0, 0, 0, :4] = torch.tensor([1.0, -2.0, 2.0, 0.0])  # L1 = 5, L2 = 3
    assert torch.allclose(VCE(model, 1, start, lam=0.1, norm="l1")(x), torch.tensor([-math.log(0.75) + 0.5]))
    assert torch.allclose(VCE(model, 1, start, lam=0.1, norm="l2")(x), torch.tensor([-math.log(0.75) + 0.3]))
    assert torch.allclose(ClassVisualisation(model, 0)(x), torch.tensor([-math.log(0.25)]))
    assert torch.allclose(distance(x, start, "l1"), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="l1, l2"):
        VCE(model, 1, start, norm="linf")


def test_pixel_spaces_agree_with_the_project_normalisation():
    images = torch.arange(0, 256, dtype=torch.uint8)[:192].view(3, 1, 8, 8)
    mean, std = (0.3,), (0.2,)
    assert torch.allclose(uint8_to_classifier(images, mean, std), normalize(images, mean, std))
    x = uint8_to_diffusion(images)
    assert x.min() == -1 and torch.allclose(diffusion_to_classifier(x, mean, std), normalize(images, mean, std), atol=1e-5)
    assert torch.allclose(classifier_to_diffusion(diffusion_to_classifier(x, mean, std), mean, std), x, atol=1e-5)
    assert torch.equal(diffusion_to_uint8(x), images)


# --- the guided chain -------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradient(monkeypatch):
    import overinterp.explain.ddim as ddim

    checkpointed = []  # the chain's steps run under torch.utils.checkpoint
    real = ddim.checkpoint
    monkeypatch.setattr(ddim, "checkpoint", lambda fn, *args, **kwargs: checkpointed.append(args[-1]) or real(fn, *args, **kwargs))
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    den = Denoiser(unet, DDIMScheduler(num_train_timesteps=100, clip_sample=False), (1, 8, 8))
    sched = schedule(den, 4)
    grads = []
    for ckpt in (False, True):
        z = initial_noise([0, 1], (1, 8, 8)).requires_grad_(True)
        loss = Brightness()(ddim_chain(den, z, sched, ckpt)).logsumexp(1).sum()
        grads.append(torch.autograd.grad(loss, z)[0])
        assert checkpointed == (list(range(len(sched.timesteps))) if ckpt else [])  # every step, or none
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_names_a_registered_method():
    assert set(METHODS) == {"noise", "universal"}
    with pytest.raises(ValueError, match="noise, universal"):
        GuidanceConfig(method="dps")


@pytest.mark.parametrize("method", ["noise", "universal"])
def test_vce_reaches_the_target_against_a_hand_built_classifier(method):
    den, start = gaussian_prior(), dark_images()
    obj = VCE(Brightness(), 1, uint8_to_classifier(start, MEAN, STD), lam=0.02)
    res = generate(den, obj, MEAN, STD, GuidanceConfig(method=method, steps=10, iterations=20, lr=0.2, scale=20.0), start=start)
    assert (p_bright(res.start_images) < 0.01).all()  # the inversion's reconstruction is still dark
    assert (p_bright(res.images) >= 0.9).all(), p_bright(res.images)
    assert (res.objective_end < res.objective_start - 1).all()
    assert res.images.dtype == torch.uint8 and res.seeds.tolist() == [-1, -1, -1] and res.targets.tolist() == [1, 1, 1]


@pytest.mark.parametrize("method", ["noise", "universal"])
def test_class_visualisation_from_seeds_beats_the_unguided_samples(method):
    den = gaussian_prior()
    res = generate(den, ClassVisualisation(Brightness(), 1), MEAN, STD, GuidanceConfig(method=method, iterations=10, lr=0.2, scale=20.0),
                   seeds=[0, 1, 2, 3])
    assert (p_bright(res.start_images) < 0.9).all() and (p_bright(res.images) >= 0.9).all()
    assert res.seeds.tolist() == [0, 1, 2, 3] and torch.equal(res.start_images, generate(
        den, ClassVisualisation(Brightness(), 1), MEAN, STD, GuidanceConfig(method=method, iterations=0, scale=0.0), seeds=[0, 1, 2, 3]).images)


@pytest.mark.parametrize("method", ["noise", "universal"])
def test_an_image_does_not_depend_on_its_batch(method):
    den, cfg = gaussian_prior(), GuidanceConfig(method=method, iterations=5, lr=0.2, scale=20.0)
    both = generate(den, ClassVisualisation(Brightness(), torch.tensor([1, 0])), MEAN, STD, cfg, seeds=[3, 4])
    alone = generate(den, ClassVisualisation(Brightness(), 0), MEAN, STD, cfg, seeds=[4])
    assert (both.images[1].int() - alone.images[0].int()).abs().max() <= 1  # float sums in another order may round 1 level apart
