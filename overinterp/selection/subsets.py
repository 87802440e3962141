"""From a removal order to pixel subsets: SIS at a threshold, keep-masks, random orders."""

from __future__ import annotations

import numpy as np
import torch

from overinterp.selection.cost import n_keep
from overinterp.selection.engine import ranks

NO_SIS = -1  # sis_size for an image whose unmasked confidence is below tau


def sis_size(curve: torch.Tensor, confidence: torch.Tensor, tau: float) -> torch.Tensor:
    """Size of the sufficient input subset at threshold tau, per image.

    The SIS is the shortest tail of the removal order (k >= 1 last-removed pixels) whose image,
    with only those pixels unmasked, has p(c) >= tau. With only the last k unmasked, the first
    HW - k pixels are removed, so p(c) = curve[HW - k - 1] (k < HW) or the confidence (k = HW).

    Args:
        curve: (B, HW) p(c) after each removal; confidence: (B,) p(c) unmasked.
    Returns:
        (B,) int64 sizes in [1, HW], or NO_SIS (-1) where confidence < tau.
    """
    B, HW = curve.shape
    # value_by_size[:, k-1] = p(c) with only the last k pixels unmasked
    value_by_size = torch.cat([curve.flip(1)[:, 1:], confidence[:, None].to(curve.dtype)], dim=1)
    ok = value_by_size >= tau
    first = ok.float().argmax(1) + 1  # argmax of a 0/1 row = first True
    return torch.where(confidence >= tau, first, torch.full_like(first, NO_SIS))


def tail_mask(order: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Boolean (B, HW) mask of the last sizes[b] removed pixels of each image (0 or less: empty)."""
    return ranks(order) >= (order.shape[1] - sizes.clamp(min=0))[:, None]


def keep_mask(order: torch.Tensor, frac: float) -> torch.Tensor:
    """Boolean (B, HW) mask of the pixels backward selection removed last.

    order: (B, HW) pixel indices, earliest removal first.
    frac: fraction of pixels to keep, in (0, 1]; the paper keeps 5% on CIFAR-10.
    """
    k = n_keep(frac, order.shape[1])
    mask = torch.zeros_like(order, dtype=torch.bool)
    mask.scatter_(1, order[:, -k:], True)  # the last removed are the most sufficient
    return mask


def sis_mask(order: torch.Tensor, curve: torch.Tensor, confidence: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean (B, HW) SIS mask at tau (all False for images without a SIS)."""
    return tail_mask(order, sis_size(curve, confidence, tau))


SPLIT_CODES = {"train": 0, "test": 1}


def random_order(image_ids: np.ndarray, hw: int, seed: int, split: str) -> torch.Tensor:
    """A random "removal order" per image: (B, HW) permutations, its tail is a random subset.

    Each image's permutation is fixed by (seed, split, image id) alone, so it does not depend on
    batching or on which worker draws it, and train and test use different streams.
    """
    out = torch.empty(len(image_ids), hw, dtype=torch.long)
    for row, image_id in enumerate(image_ids):  # per image, not per pixel
        state = np.random.SeedSequence([seed, SPLIT_CODES[split], int(image_id)]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        out[row] = torch.randperm(hw, generator=gen)
    return out


def apply_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask normalised images: x (N, C, H, W), keep (N, HW) bool -> pixels not kept set to 0."""
    N, C, H, W = x.shape
    return x * keep.view(N, 1, H, W).to(x.dtype)


def dilate_keep(keep: torch.Tensor, height: int, width: int, radius: int = 1) -> torch.Tensor:
    """(N, HW) bool -> (N, HW) bool: every kept pixel's (2r+1)×(2r+1) neighbourhood kept too.

    The critique of SIS on gradient-selected subsets: restore the true pixels around each SIS pixel
    (r = 1: 3×3) and see whether the model's confidence holds. If it collapses when *more* of the
    real image is shown, the subset works like an adversarial pattern rather than evidence.
    """
    n = keep.shape[0]
    grid = keep.view(n, 1, height, width).float()
    grown = torch.nn.functional.max_pool2d(grid, 2 * radius + 1, stride=1, padding=radius)
    return grown.view(n, height * width) > 0
