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

Deviations from the references, all recorded in PerturbationParams (params.py, with the sources
of its defaults): the blur is one Gaussian (the seed script averages a Gaussian and a median blur
and later uses the median blur alone; the authors' code blurs with radius 10 at 224 px), σ and
the mask side scale with the image side with floors for small images; no random jitter and no
blur of the mask (the authors' code uses 4 px jitter and σ = 5 mask blur); the mask starts at 1
everywhere (seed script; the authors start from a blurred circle). Passes: see cost.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from overinterp.selection.engine import EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images, widen
from overinterp.selection.params import PerturbationParams
from overinterp.selection.ranking import explain, scored_result


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
        forward, images, target: as every selector takes them (engine.py); all B masks are optimised together.
        params: hyper-parameters (PerturbationParams; defaults from the authors and the seed script).
        seed: seeds the input noise (a function of seed and step only).
        config: how the curve's candidates are batched (see EngineConfig).
        on_passes: called with the forward passes made, per iteration and per chunk of the curve
            (see engine.PassesFunc).
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
