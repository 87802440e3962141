"""Meaningful perturbation (Fong & Vedaldi, ICCV 2017) as a pixel ranking, B images at once.

Each image gets a low-resolution mask m in [0, 1] (1 = keep), upsampled bilinearly to the image;
the model sees m·x + (1 − m)·blur(x) + noise. Adam minimises, per image,

    p(c | perturbed image) + l1 · mean|1 − m| + tv · (mean |Δ_rows m|^β + mean |Δ_cols m|^β)

(the "deletion" game: find the smallest, smoothest blurred region that drives p(c) down), with m
clamped to [0, 1] after every step. A pixel's importance is 1 − (upsampled final mask): how much
it had to be deleted. The removal order sorts pixels least important first, ties (e.g. pixels left
at exactly m = 1) to the lowest index; the p(c) curve then masks them to the mean colour (0) one
by one, as for every ranking selector (ranking.py).

Batching never changes an image's result: the loss is a sum over images, so each mask gets only
its own image's gradient, and Adam's updates are per element; the input noise is a function of
(seed, step) alone, the same draw for every image of the batch, so an image gets the same noise
alone or among 16 others.

Deviations from the references, all recorded in PerturbationParams: the blur is one Gaussian (the
seed script averages a Gaussian and a median blur and later uses the median blur alone; the
authors' code blurs with radius 10 at 224 px), σ and the mask side scale with the image side
with floors for small images; no random jitter and no blur of the mask (the authors' code uses
4 px jitter and σ = 5 mask blur); the mask starts at 1 everywhere (seed script; the authors start
from a blurred circle).

Cost: `iterations` forward + backward passes of the B images (the backward differentiates with
respect to the masks only), then B·HW forward passes for the curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from overinterp.selection.backselect import EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, widen
from overinterp.selection.ranking import check_images, explain, scored_result

# Sources: "authors" = Fong & Vedaldi's code (github.com/ruthcfong/perturb_explanations,
# optimize_mask.py defaults); "seed script" = jacobgil/pytorch-explain-black-box explain.py (HEAD).


@dataclass(frozen=True)
class PerturbationParams:
    """Every hyper-parameter of the meaningful-perturbation selector; `asdict` is its record."""

    iterations: int = 300  # Adam steps; authors num_iters=300 (the seed script went 300 -> 500)
    lr: float = 0.1  # Adam learning rate on the mask (mask units per step, roughly); authors and seed script
    l1_coeff: float = 0.01  # weight of mean|1 - m| over the low-res mask; seed script (authors: 1e-4 on the sum over 28x28)
    tv_coeff: float = 0.2  # weight of the total variation of the low-res mask; seed script (authors: 1e-2 on a sum)
    tv_beta: float = 3.0  # exponent of the TV term; authors and seed script (and issue 11)
    mask_scale: int = 8  # mask side = image side / mask_scale, rounded: 28 at 224 px (authors' mask_scale=8, seed script 28x28)
    min_mask_side: int = 8  # ours: floor on the mask side (capped at the image side) so 32 px images get 8x8, 8 px images 8x8
    blur_sigma: float = 10 / 224  # Gaussian σ as a fraction of the image side: 10 px at 224 (authors' blur radius 10 at 224 px)
    min_blur_sigma: float = 1.0  # ours: floor on σ, in pixels, so small images are blurred at all (σ would be 0.36 px at 8 px)
    blur_truncate: float = 3.0  # ours: kernel radius = ceil(blur_truncate · σ) pixels (61x61 at 224 px); edges replicated
    noise_std: float = 0.2  # std of the Gaussian noise added to the perturbed input each step, in normalised units; seed script

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            want = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
                raise ValueError(f"perturbation {f.name} must be {'an int' if want is int else 'a number'}, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"perturbation {f.name} must be finite, got {value!r}")
        positive = ("iterations", "lr", "tv_beta", "mask_scale", "min_mask_side", "blur_sigma", "blur_truncate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"perturbation {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("l1_coeff", "tv_coeff", "min_blur_sigma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"perturbation {name} must be >= 0 (0 switches it off), got {getattr(self, name)!r}")
        if self.tv_beta < 1:
            raise ValueError(f"perturbation tv_beta must be >= 1 (|Δm|^β is not differentiable at 0 below 1), got {self.tv_beta}")

    @classmethod
    def from_dict(cls, params: Optional[dict]) -> "PerturbationParams":
        """From a JSON/CLI dict; unknown keys fail with the list of valid ones."""
        params = dict(params or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown perturbation parameter(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        return cls(**params)

    def tag_params(self) -> dict:
        """Short parameters for a store tag: {"it": 300} plus every field changed from its default."""
        default = PerturbationParams()
        out = {"it": self.iterations}
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name != "iterations" and getattr(self, f.name) != getattr(default, f.name)})
        return out

    def geometry(self, height: int, width: int) -> dict:
        """What the fractions mean for one image size: mask side, blur σ and kernel radius per axis."""
        mask = tuple(max(round(s / self.mask_scale), min(s, self.min_mask_side)) for s in (height, width))
        sigma = tuple(max(self.blur_sigma * s, self.min_blur_sigma) for s in (height, width))
        radius = tuple(math.ceil(self.blur_truncate * s) for s in sigma)
        return {"mask": mask, "sigma": sigma, "radius": radius}


def gaussian_blur(images: torch.Tensor, sigma: tuple[float, float], radius: tuple[int, int]) -> torch.Tensor:
    """Separable Gaussian blur of each channel, edges replicated: (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = images.shape
    out = images
    for axis, (s, r) in enumerate(zip(sigma, radius)):
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / s) ** 2)
        k = (k / k.sum()).to(images.device, images.dtype)
        if axis == 0:  # vertical
            out = F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
        else:
            out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return out


def _tv(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, 1, h, w) -> (B,) mean |Δ_rows|^β + mean |Δ_cols|^β (0 along an axis of length 1)."""
    rows = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(beta).flatten(1)
    cols = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(beta).flatten(1)
    zero = mask.new_zeros(mask.shape[0])
    return (rows.mean(1) if rows.shape[1] else zero) + (cols.mean(1) if cols.shape[1] else zero)


def optimise_masks(
    forward: ForwardFunc,
    images: torch.Tensor,
    target: torch.Tensor,
    params: PerturbationParams = PerturbationParams(),
    seed: int = 0,
    on_passes: Optional[PassesFunc] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn the deletion masks of B images at once (on_passes hears of B passes per iteration).

    Returns:
        mask (B, 1, h, w) in [0, 1] (1 = keep), and p(target) (B,) float32 on the image perturbed
        by the final upsampled mask, without noise: how far the deletion drove p(c) down.
    """
    B, C, H, W = images.shape
    geo = params.geometry(H, W)
    dtype = torch.promote_types(images.dtype, torch.float32)
    x = images.to(dtype)
    with torch.no_grad():
        blurred = gaussian_blur(x, geo["sigma"], geo["radius"])  # (B, C, H, W)
    rows = torch.arange(B, device=images.device)
    mask = torch.ones(B, 1, *geo["mask"], device=images.device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([mask], lr=params.lr)
    # the noise depends on (seed, step) only: the same draw for every image, alone or batched
    gen = torch.Generator(device=images.device).manual_seed(seed)

    def perturbed(m: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)  # (B, 1, H, W)
        return up * x + (1 - up) * blurred

    with torch.enable_grad():
        for _ in range(params.iterations):
            inp = perturbed(mask)
            if params.noise_std > 0:
                inp = inp + params.noise_std * torch.randn((1, C, H, W), generator=gen, device=images.device, dtype=dtype)
            p = torch.softmax(widen(forward(inp)), 1)[rows, target]  # (B,)
            loss = p + params.l1_coeff * (1 - mask).abs().flatten(1).mean(1) + params.tv_coeff * _tv(mask, params.tv_beta)
            # a sum over images: each mask's gradient is its own image's (batching changes nothing)
            (mask.grad,) = torch.autograd.grad(loss.sum(), mask)  # the model's weights get no .grad
            opt.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
            if on_passes is not None:
                on_passes(B)
    with torch.no_grad():
        final = torch.softmax(widen(forward(perturbed(mask))), 1)[rows, target].float()
    if on_passes is not None:
        on_passes(B)
    return mask.detach(), final


def meaningful_perturbation(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    params: PerturbationParams = PerturbationParams(),
    target: Optional[torch.Tensor] = None,
    seed: int = 0,
    config: EngineConfig = EngineConfig(),
    on_passes: Optional[PassesFunc] = None,
) -> SelectionResult:
    """Rank pixels by meaningful perturbation (deletion), then compute the p(c) curve of the ranking.

    Args:
        forward: model in eval mode on the images' device, (N, C, H, W) -> logits (N, K).
        images: (B, C, H, W) normalised floats; all B masks are optimised together.
        params: hyper-parameters (PerturbationParams; defaults from the authors and the seed script).
        target: (B,) class to explain; default the prediction on the unmasked image.
        seed: seeds the input noise (a function of seed and step only).
        config: how the curve's candidates are batched (see EngineConfig).
        on_passes: called with the forward passes made, per iteration and per chunk of the curve
            (see backselect.PassesFunc).
    Returns:
        SelectionResult: order (B, HW) least important first, curve (B, HW), step_sizes (1,)*HW;
        forward_passes = B·iterations (each also one backward pass, not counted separately)
        + B + B·HW (the final perturbed image and the curve). The unmasked prediction is not counted.
    """
    check_images(images)
    if not isinstance(params, PerturbationParams):
        raise ValueError(f"params must be a PerturbationParams (use PerturbationParams.from_dict), got {type(params).__name__}")
    B, C, H, W = images.shape
    scorer = Scorer(forward, config, images)  # fixes the model's memory format before it runs
    explained = explain(scorer, images, target)
    mask, _ = optimise_masks(forward, images, explained[0], params, seed, on_passes)
    importance = 1 - F.interpolate(mask, size=(H, W), mode="bilinear", align_corners=False).view(B, H * W)
    return scored_result(scorer, images, importance, explained, B * (params.iterations + 1), on_passes)


def perturbation_record(params: PerturbationParams, seed: int = 0) -> dict:
    """The JSON-ready record of a run's parameters: every field and the seed."""
    return {**dataclasses.asdict(params), "seed": seed}
