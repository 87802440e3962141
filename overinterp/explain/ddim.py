"""The deterministic DDIM chain (Song et al., ICLR 2021, eta = 0), written out on tensors so that
guidance can differentiate through it and invert it.

All images here are in diffusion units, [-1, 1], (B, C, H, W). ᾱ_t is the scheduler's
`alphas_cumprod[t]`. One step from level t to the next lower level p:

    eps, x̂0 = the network's prediction at (x_t, t)      (x̂0 = (x_t - √(1-ᾱ_t)·eps) / √ᾱ_t)
    x_p      = √ᾱ_p · x̂0 + √(1-ᾱ_p) · eps

and inversion runs the same update upwards, with eps taken at the *target* level's timestep from
the current image (the usual first-order approximation: it is exact when eps does not depend on
x, and its error shrinks with the step size). No x̂0 clipping: clipping would make the chain
non-invertible, so only the final image is clamped (pixels.diffusion_to_uint8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Denoiser:
    """A denoising network and its noise schedule: all the DDIM chain and guidance need.

    net: called as net(x_t (B, C, H, W), t (B,) int64); returns the prediction, or an object whose
        `.sample` is it (diffusers' UNet2DModel). Any module works (the tests use closed-form ones).
    scheduler: a diffusers DDIMScheduler (or any object with its config, alphas_cumprod and
        set_timesteps); it is copied, never mutated, to pick the timesteps of a chain.
    shape: (C, H, W) of one image.
    """

    net: nn.Module
    scheduler: object
    shape: tuple[int, int, int]

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def predict(self, x: torch.Tensor, t: int, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x̂0) at timestep t from x (B, C, H, W); alpha: ᾱ_t as a 0-dim tensor."""
        out = self.net(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device))
        out = getattr(out, "sample", out)
        a, b = alpha.sqrt(), (1 - alpha).sqrt()
        if self.prediction_type == "epsilon":
            return out, (x - b * out) / a
        if self.prediction_type == "v_prediction":  # v = √ᾱ·eps - √(1-ᾱ)·x0
            return a * out + b * x, a * x - b * out
        return (x - a * out) / b, out  # "sample": the network predicts x0


@dataclass(frozen=True)
class Schedule:
    """The levels of an S-step chain, highest noise first.

    timesteps: (S,) int64; alpha: (S,) ᾱ at each timestep; alpha_prev: (S,) ᾱ of the level each
    step lands on (the last one is the scheduler's final ᾱ, 1 with set_alpha_to_one).
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    alpha_prev: torch.Tensor


def schedule(denoiser: Denoiser, steps: int, device: torch.device | str = "cpu") -> Schedule:
    """The S = steps levels the scheduler picks for an S-step DDIM chain (its timestep spacing)."""
    if steps < 1:
        raise ValueError(f"DDIM steps must be >= 1, got {steps}")
    sched = type(denoiser.scheduler).from_config(denoiser.scheduler.config)  # set_timesteps mutates: use a copy
    sched.set_timesteps(steps)
    ts = sched.timesteps.to(torch.long)
    ac = sched.alphas_cumprod.to(torch.float32)
    final = ac.new_tensor(1.0) if sched.config.get("set_alpha_to_one", True) else ac[0]
    alpha = ac[ts]
    alpha_prev = torch.cat([ac[ts[1:]], final.view(1)])
    return Schedule(ts.to(device), alpha.to(device), alpha_prev.to(device))


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_next: torch.Tensor) -> torch.Tensor:
    """The image at level ᾱ_next on the deterministic path through (x̂0, eps)."""
    return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps


def ddim_step(denoiser: Denoiser, x: torch.Tensor, sched: Schedule, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step i of the chain: (x at the next lower level, x̂0 predicted at this one)."""
    eps, x0 = denoiser.predict(x, int(sched.timesteps[i]), sched.alpha[i])
    return ddim_update(x0, eps, sched.alpha_prev[i]), x0


def _next_level(den: Denoiser, x: torch.Tensor, sched: Schedule, i: int) -> torch.Tensor:
    return ddim_step(den, x, sched, i)[0]


def ddim_chain(den: Denoiser, x_T: torch.Tensor, sched: Schedule, checkpointing: bool = False) -> torch.Tensor:
    """x_T -> x0 (diffusion units, not clamped) through every level of sched, differentiably;
    checkpointing recomputes each step's activations in the backward pass (S images held, not S UNets')."""
    x = x_T
    for i in range(len(sched.timesteps)):
        x = checkpoint(_next_level, den, x, sched, i, use_reentrant=False) if checkpointing else _next_level(den, x, sched, i)
    return x


def ddim_sample(denoiser: Denoiser, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """x_T (B, C, H, W) -> x0 in diffusion units (not clamped), deterministically."""
    return ddim_chain(denoiser, x_T, schedule(denoiser, steps, x_T.device))


def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """x0 (B, C, H, W) in diffusion units -> the x_T from which ddim_sample(steps) returns ~x0."""
    sched = schedule(denoiser, steps, x0.device)
    x = x0
    for i in reversed(range(steps)):  # from the clean level up to the noisiest
        eps = denoiser.predict(x, int(sched.timesteps[i]), sched.alpha[i])[0]
        clean = (x - (1 - sched.alpha_prev[i]).sqrt() * eps) / sched.alpha_prev[i].sqrt()  # x̂0 at the current level
        x = ddim_update(clean, eps, sched.alpha[i])
    return x


def initial_noise(seeds: list[int] | torch.Tensor, shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, C, H, W) standard normal x_T, image i drawn from its own seed: an image does not depend
    on the others in its batch."""
    seeds = [int(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
