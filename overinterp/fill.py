"""How removed pixels are filled: the mean colour, or ROAD's noisy linear imputation.

"mean": a removed pixel is 0 on every channel after normalisation, i.e. the data set's mean colour
(the paper's convention, `apply_mask`). The *shape* of the removed region can then leak the class.

"road": noisy linear imputation (Rong, Leemann et al., "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022; `NoisyLinearImputer` in their road_evaluation code and
`noisy_linear_imputation` in Quantus 0.6.0). Each removed pixel u, per channel, equals the weighted
mean of its 8 neighbours — weight 1/6 for the 4 edge neighbours, 1/12 for the 4 diagonal ones —
over the neighbours inside the image (renormalised at the border, as the reference does by lowering
the diagonal), with unknown neighbours unknowns of the same system:

    d_u x_u - sum_{v unknown} w_uv x_v = sum_{k known} w_uk x_k,   d_u = sum_{n in image} w_un.

Then Gaussian noise is added to the removed pixels (σ = 0.01). Kept pixels are returned bit-for-bit.

Units. The reference imputes [0, 1] images (its experiments apply ToTensor, impute, then
Normalize) and adds σ = 0.01 in those units. Our images are normalised per channel. The linear part
commutes with (x - mean) / std (the weights of each equation sum to 1, so the solution is an affine
combination of known pixels), so we solve on the normalised values; the noise is σ = noise_std in
[0, 1] pixel units, i.e. noise_std / std[c] in channel c of x when `std` is given. With std=None
the noise is added in x's own units (what Quantus does on whatever array it is given).

Solver. The system above, times 12, is A x_u = b with A p = u ⊙ (S1 ⊙ p - S p) on the pixel grid
(p zero at kept pixels, u = 1 at removed ones), where S is the [1,2,1] ⊗ [1,2,1] stencil with zeros outside the image (S p = 12 W p + 4 p, and
S1 = S applied to ones, so 12 d = S1 - 4). A is symmetric (w_uv = w_vu) and, when the image keeps at
least one pixel, positive definite: every connected region of removed pixels borders a kept pixel
(a region that borders none is the whole image), so A is irreducibly diagonally dominant. Conjugate
gradients therefore converge, here for all images and channels at once as a batch of independent
systems (one step size per image and channel), each frozen once its residual is below
tol · |b| (relative, Euclidean; tol = 1e-5 leaves per-pixel errors up to ~5e-4, mean ~1e-5, in
normalised units against Quantus's direct solve, `benchmarks/bench_road.py` — far below the noise,
0.01 / std ≈ 0.04).
Iterations grow with the size of the removed regions, not with the image: at tol = 1e-5, 15 at 50%
random removal, 37 at 90%, 55 at 95% (32²; 14, 36, 54 at 224²); ~1.4 (H + W) for a single kept pixel
in a corner (92 at 32², 634 at 224²), because CG needs ~√κ steps and κ grows with the square of a
hole's diameter. The cap is max_iter (default 4 (H + W) + 64; a warning gives the residual if reached).
An image with no kept pixel at all has A singular and b = 0. CG from 0 keeps it at 0 (the
minimum-norm solution), as the reference's spsolve returns 0 for it; 0 is in the units of the input,
so here the removed pixels get the mean colour (the reference, on [0, 1] images: black), then noise.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from overinterp.selection.subsets import apply_mask

FILLS = ("mean", "road")
ROAD_NOISE_STD = 0.01  # σ in [0, 1] pixel units (Rong et al. 2022)
CHECK_EVERY = 8  # CG iterations between convergence checks on an accelerator (the solver's only host sync)


def fill(
    x: torch.Tensor,
    keep: torch.Tensor,
    how: str = "mean",
    *,
    std: Optional[Sequence[float]] = None,
    noise_std: float = ROAD_NOISE_STD,
    generator: Optional[torch.Generator] = None,
    seeds: Optional[Sequence[int]] = None,
    tol: float = 1e-5,
    max_iter: Optional[int] = None,
) -> torch.Tensor:
    """Fill the pixels outside `keep` of normalised images.

    From uint8 images as training has them: fill(normalize(images, mean, std), keep, how, std=std,
    generator=gen) — the same keep mask `apply_mask` takes.

    Args:
        x: (N, C, H, W) float images, normalised (0 = the data set's mean colour).
        keep: (N, H*W) bool, True = pixel kept (its value is returned unchanged).
        how: "mean" (removed pixels 0 on every channel) or "road" (noisy linear imputation).
        std: the per-channel std x was normalised with (`ImageDataset.std`); the noise is then
            noise_std in [0, 1] pixel units. None: noise_std in x's own units.
        noise_std: σ of the Gaussian noise on removed pixels ("road" only); 0 = no noise.
        generator: draws the whole batch's noise (on its own device). Same state, same output.
        seeds: (N,) one seed per image instead: image i's noise comes from its own stream seeded
            with seeds[i], so it does not depend on which images share the batch.
        tol, max_iter: CG stopping rule (relative residual) and cap (see the module docstring).
    Returns:
        (N, C, H, W) tensor like x.
    """
    _check(x, keep, how, std, noise_std, seeds)
    if how == "mean":
        return apply_mask(x, keep)
    N, C, H, W = x.shape
    keep4 = keep.view(N, 1, H, W)
    solved, _ = solve_road(x, keep, tol=tol, max_iter=max_iter)
    if noise_std > 0:  # σ = noise_std / std[c] ([0, 1] pixel units), or noise_std in x's units without std
        if seeds is not None:
            z = torch.empty_like(x)
            for i, seed in enumerate(seeds):  # one stream per image (N small draws, not per pixel)
                gen = torch.Generator(device=x.device).manual_seed(int(seed))
                z[i] = torch.randn((C, H, W), generator=gen, device=x.device, dtype=x.dtype)
        elif generator is not None:
            z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        else:
            z = torch.randn_like(x)
        scale = noise_std if std is None else (noise_std / torch.tensor(std, dtype=x.dtype, device=x.device)).view(1, C, 1, 1)
        solved = solved + z * scale
    return torch.where(keep4, x, solved)


def _check(x, keep, how, std, noise_std, seeds) -> None:
    if how not in FILLS:
        raise ValueError(f"unknown fill {how!r}: choose one of {', '.join(FILLS)}")
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be float (N, C, H, W) images, got {tuple(x.shape)} {x.dtype}")
    N, C, H, W = x.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (N, H * W):
        raise ValueError(f"keep must be bool (N, H*W) = ({N}, {H * W}), got {tuple(keep.shape)} {keep.dtype}")
    if keep.device != x.device:
        raise ValueError(f"keep is on {keep.device} but x on {x.device}: move them to one device")
    if std is not None and len(std) != C:
        raise ValueError(f"std needs one value per channel ({C}), got {len(std)}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if seeds is not None and len(seeds) != N:
        raise ValueError(f"seeds needs one seed per image ({N}), got {len(seeds)}")


def stencil(p: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = S p: each pixel's 3x3 window weighted [1,2,1] x [1,2,1], zeros outside the image.

    Two separable passes of shifted in-place adds (no padding copies); S p = 12 W p + 4 p, where
    W p is the ROAD neighbour sum (1/6 edge, 1/12 diagonal neighbours). tmp, out: like p.
    """
    torch.mul(p, 2, out=tmp)
    tmp[..., 1:, :] += p[..., :-1, :]
    tmp[..., :-1, :] += p[..., 1:, :]
    torch.mul(tmp, 2, out=out)
    out[..., 1:] += tmp[..., :-1]
    out[..., :-1] += tmp[..., 1:]
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image and channel: (N, C, H, W) x2 -> (N, C, 1, 1)."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]


def solve_road(
    x: torch.Tensor, keep: torch.Tensor, tol: float = 1e-5, max_iter: Optional[int] = None
) -> tuple[torch.Tensor, int]:
    """ROAD's linear imputation without noise, by batched conjugate gradients on x's device.

    Args:
        x: (N, C, H, W) float; keep: (N, H*W) bool.
    Returns:
        (N, C, H, W) values at removed pixels (0 at kept ones), and the iterations run.
    """
    N, C, H, W = x.shape
    max_iter = 4 * (H + W) + 64 if max_iter is None else max_iter
    known = keep.view(N, 1, H, W).to(x.dtype)
    unknown = 1 - known  # (N, 1, H, W)
    tmp, q = torch.empty_like(x), torch.empty_like(x)
    ones = torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device)
    a = stencil(ones, torch.empty_like(ones), torch.empty_like(ones)) * unknown  # S1 = 12 d + 4, on unknowns
    b = stencil(x * known, tmp, q) * unknown  # 12 sum_k w_uk x_k (the -4 x term is 0 at unknowns)
    sol = torch.zeros_like(x)
    r, p, Ap = b.clone(), b.clone(), torch.empty_like(x)
    rr = _dot(r, r)  # (N, C, 1, 1)
    threshold = (tol * tol) * rr
    it = 0
    active = rr > threshold  # b = 0 (nothing removed, or nothing kept): solution 0, no iterations
    check_every = 1 if x.device.type == "cpu" else CHECK_EVERY  # on a CPU the check costs nothing
    while it < max_iter:
        if it % check_every == 0 and not bool(active.any()):  # host sync, once per check_every steps
            break
        stencil(p, tmp, q)
        torch.mul(p, a, out=Ap)
        Ap.addcmul_(q, unknown, value=-1)  # A p = u ⊙ (S1 ⊙ p - S p); p is 0 at kept pixels
        alpha = torch.where(active, rr / _dot(p, Ap), 0)  # frozen systems take no step
        sol.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1)
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / rr, 0)
        p.mul_(beta).add_(r)
        rr = torch.where(active, rr_new, rr)
        active = rr > threshold
        it += 1
    if it == max_iter and bool(active.any()):
        worst = float((rr / threshold.clamp_min(torch.finfo(x.dtype).tiny)).max().sqrt()) * tol
        warnings.warn(f"ROAD fill: CG stopped at max_iter={max_iter} with relative residual {worst:.1e} > tol={tol}")
    return sol, it
