"""overinterp/explain/ddim.py and prior.py: the DDIM chain against diffusers' own step, its
determinism and inversion, and the resumable training of the prior. Tiny UNets (8 and 16
channels) on 8x8 images; every test takes about a second on one CPU thread."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # the `explain` extra
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel  # noqa: E402

from denoisers import GaussianOptimal  # noqa: E402
from overinterp.explain.ddim import Denoiser, ddim_invert, ddim_sample, ddim_step, initial_noise, schedule  # noqa: E402
from overinterp.explain.prior import (  # noqa: E402
    PriorConfig, as_denoiser, load_checkpoint, load_generator, sample, save_generator, train_prior,
)

torch.set_num_threads(1)

TINY = dict(channels=(8, 16), norm_groups=4, batch_size=16, train_timesteps=100, sample_steps=5, lr=2e-3)


def tiny_images(n=32, seed=0):
    """(n, 1, 8, 8) uint8 bright squares of random size and place on black: a learnable toy data set."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, 8, 8), np.uint8)
    for i in range(n):
        s = rng.integers(2, 5)
        r, c = rng.integers(0, 8 - s, 2)
        out[i, 0, r:r + s, c:c + s] = 255
    return out


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()


class ConstantEps(torch.nn.Module):
    """eps does not depend on x: DDIM inversion is then the exact inverse of sampling."""

    def __init__(self, shape):
        super().__init__()
        self.eps = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def forward(self, x, t):
        return self.eps.expand_as(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


def test_ddim_step_equals_diffusers_ddim_scheduler_step_with_eta_0():
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False, beta_schedule="squaredcos_cap_v2")
    den = Denoiser(tiny_unet(), sched, (1, 8, 8))
    s = schedule(den, 5)
    ref = DDIMScheduler.from_config(sched.config)
    ref.set_timesteps(5)
    assert torch.equal(s.timesteps, ref.timesteps)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = x.clone()
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            x = ref.step(den.net(x, t).sample, t, x, eta=0.0).prev_sample
            ours = ddim_step(den, ours, s, i)[0]
            assert torch.allclose(ours, x, atol=1e-5), i


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch():
    unet = tiny_unet()
    cfg = PriorConfig(**TINY)
    a, b = sample(unet, cfg, 4, 7), sample(unet, cfg, 4, 7)
    assert a.dtype == torch.uint8 and a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    assert torch.equal(sample(unet, cfg, 2, 9), a[2:])  # image i of seed s is seed s + i alone
    assert not torch.equal(sample(unet, cfg, 4, 8), a)


def test_inversion_is_exact_when_eps_does_not_depend_on_x():
    den = Denoiser(ConstantEps((1, 8, 8)), DDIMScheduler(num_train_timesteps=100, clip_sample=False), (1, 8, 8))
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = ddim_invert(den, x0, 10)
    assert (x_T - x0).abs().max() > 0.5  # it went somewhere
    assert torch.allclose(ddim_sample(den, x_T, 10), x0, atol=1e-4)


def test_inversion_then_sampling_reconstructs_with_a_smooth_denoiser_and_converges_with_steps():
    # With the exact denoiser of Gaussian data the DDIM ODE is smooth and linear; the only error is
    # inversion's first-order approximation (eps taken one level off), so the round trip's error
    # falls like 1/steps: 5x the steps, 1/5 of the error (measured 0.22, 0.049, 0.010 at 10, 50, 250
    # steps on images with max |x0| = 1.4). A zeroth-order bug (a level off for good) would not shrink.
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, beta_schedule="squaredcos_cap_v2")
    den = Denoiser(GaussianOptimal(sched.alphas_cumprod), sched, (1, 8, 8))
    x0 = 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    err = {n: float((ddim_sample(den, ddim_invert(den, x0, n), n) - x0).abs().max()) for n in (10, 50, 250)}
    assert 4 < err[10] / err[50] < 6 and 4 < err[50] / err[250] < 6 and err[250] < 0.015, err


def test_training_loss_decreases():
    _, losses = train_prior(tiny_images(), (0.5,), (0.5,), PriorConfig(steps=60, checkpoint_every=60, **TINY))
    assert len(losses) == 60 and np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15]), (np.mean(losses[:15]), np.mean(losses[-15:]))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path):
    images = tiny_images()
    full, full_losses = train_prior(images, (0.5,), (0.5,), PriorConfig(steps=10, checkpoint_every=5, **TINY))
    # stop at 5 (a shorter budget), then the same folder with the full budget
    _, first = train_prior(images, (0.5,), (0.5,), PriorConfig(steps=5, checkpoint_every=5, **TINY), checkpoint_dir=str(tmp_path))
    resumed, losses = train_prior(images, (0.5,), (0.5,), PriorConfig(steps=10, checkpoint_every=5, **TINY),
                                  checkpoint_dir=str(tmp_path))
    assert first == full_losses[:5] and losses == full_losses  # the curve is one curve, not two restarts
    assert _same_state(resumed, full)
    assert load_checkpoint(str(tmp_path))["step"] == 10 and os.listdir(tmp_path) == ["prior.pt"]  # no temp files left


def test_a_crash_between_checkpoints_resumes_from_the_last_one(tmp_path):
    images = tiny_images()
    cfg = PriorConfig(steps=10, checkpoint_every=3, **TINY)
    full, full_losses = train_prior(images, (0.5,), (0.5,), cfg)

    def crash(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_prior(images, (0.5,), (0.5,), cfg, checkpoint_dir=str(tmp_path), log=crash)
    assert load_checkpoint(str(tmp_path))["step"] == 6
    seen = []
    resumed, losses = train_prior(images, (0.5,), (0.5,), cfg, checkpoint_dir=str(tmp_path), log=lambda s, l: seen.append(s))
    assert seen == [9, 10] and losses == full_losses and _same_state(resumed, full)


def test_resume_with_another_config_or_other_images_is_an_error_naming_the_fix(tmp_path):
    images = tiny_images()
    train_prior(images, (0.5,), (0.5,), PriorConfig(steps=2, **TINY), checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"lr: saved 0.002, given 0.001.*another checkpoint_dir"):
        train_prior(images, (0.5,), (0.5,), PriorConfig(steps=4, **{**TINY, "lr": 1e-3}), checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="other images"):
        train_prior(tiny_images(seed=1), (0.5,), (0.5,), PriorConfig(steps=4, **TINY), checkpoint_dir=str(tmp_path))
    assert load_checkpoint(str(tmp_path))["step"] == 2  # a refused resume leaves the checkpoint alone


def test_config_is_checked_at_the_boundary():
    with pytest.raises(ValueError, match="multiples of norm_groups"):
        PriorConfig(channels=(8, 12), norm_groups=8)
    with pytest.raises(ValueError, match="beta_schedule"):
        PriorConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="fewer entries"):
        train_prior(tiny_images(2), (0.5,), (0.5,), PriorConfig(steps=1, channels=(8, 8, 8, 8, 8), norm_groups=4))


def test_load_generator_round_trips_a_saved_pipeline(tmp_path):
    unet = tiny_unet(seed=4)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipe")
    den = load_generator(str(tmp_path / "pipe"))
    assert den.shape == (1, 8, 8) and isinstance(den.scheduler, DDIMScheduler) and den.scheduler.config.num_train_timesteps == 100
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        assert torch.equal(den.net(x, t).sample, unet(x, t).sample)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_generator(str(tmp_path / "missing"))


def test_a_trained_prior_saved_as_a_pipeline_samples_the_same_images(tmp_path):
    cfg = PriorConfig(steps=3, **TINY)
    unet, _ = train_prior(tiny_images(), (0.5,), (0.5,), cfg)
    save_generator(unet, cfg, str(tmp_path / "prior"))
    den = load_generator(str(tmp_path / "prior"))
    x_T = initial_noise([0, 1], (1, 8, 8))
    with torch.no_grad():
        assert torch.allclose(ddim_sample(den, x_T, 5), ddim_sample(as_denoiser(unet, cfg), x_T, 5), atol=1e-6)
