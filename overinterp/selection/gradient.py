"""Batched Gradient SIS (the paper's method for ImageNet-sized images).

A batch of images shares one continuous mask m (B, 1, H, W), 0 = visible, 1 = masked; the model
sees (1 - m) * x, so a masked pixel is 0 after normalisation (the mean colour) on all channels.
Each step is one forward and one backward pass of sum_b p_b(c_b): among the pixels not yet masked,
the k with the largest gradient d p(c) / d m (masking them raises p(c) most, to first order) are
masked. The step at which each pixel was masked defines the order (within a step, ascending pixel
index: the step's pixels are masked together, and the store keeps only the step); the curve holds
p(c) after each step. Ties in the gradient go to the lowest pixel index.

Cost: ceil(HW / k) steps of one forward + backward on B images, against HW(HW+1)/2 forward passes
per image for exact BS; 299 px at k = 100 is 895 steps (the original example).
"""

from __future__ import annotations

from typing import Optional

import torch

from overinterp.selection.backselect import ForwardFunc, ProgressFunc, SelectionResult, explained_class, widen


def batched_gradient_sis(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    pixels_per_step: int = 100,
    target: Optional[torch.Tensor] = None,
    progress: Optional[ProgressFunc] = None,
    max_steps: Optional[int] = None,
) -> SelectionResult:
    """Run Batched Gradient SIS until every pixel is masked.

    Args:
        forward: model in eval mode on the images' device, (N, C, H, W) -> logits (N, K).
        images: (B, C, H, W) normalised floats.
        pixels_per_step: k pixels masked per step.
        target: (B,) class to explain; default the prediction on the unmasked image.
        max_steps: for benchmarks — stop after this many steps (order -1 / curve NaN beyond).
    Returns:
        SelectionResult: order (B, HW), curve (B, HW) with p(c) after the step each pixel was
        masked in, forward_passes = images x steps (each with one backward pass).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be normalised floats (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
    if pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
    B, C, H, W = images.shape
    HW = H * W
    device = images.device
    with torch.no_grad():
        probs = torch.softmax(widen(forward(images)), 1)
    target, confidence, pred = explained_class(probs, target)
    masked = torch.zeros(B, HW, dtype=torch.bool, device=device)
    order = torch.full((B, HW), -1, dtype=torch.long, device=device)
    curve = torch.full((B, HW), float("nan"), dtype=torch.float32, device=device)
    removed, steps, last = 0, 0, slice(0, 0)
    sizes: list[int] = []
    while removed < HW and (max_steps is None or steps < max_steps):
        k = min(pixels_per_step, HW - removed)
        mask = masked.to(images.dtype).view(B, 1, H, W).requires_grad_(True)
        p = torch.softmax(widen(forward((1 - mask) * images)), 1).gather(1, target[:, None]).squeeze(1)  # (B,)
        curve[:, last] = p.detach()[:, None]  # this forward sees the state after the previous step
        (grad,) = torch.autograd.grad(p.sum(), mask)
        grad = grad.view(B, HW)
        # already-masked pixels can never be chosen again
        score = torch.where(masked, torch.full_like(grad, -torch.inf), grad)
        # stable descending sort: equal gradients keep ascending pixel order
        chosen = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k].sort(1).values  # (B, k) ascending
        masked.scatter_(1, chosen, True)
        order[:, removed : removed + k] = chosen
        last = slice(removed, removed + k)
        removed += k
        steps += 1
        sizes.append(k)
        if progress is not None:
            progress(removed, HW)
    with torch.no_grad():  # p(c) after the last step (everything masked, unless stopped early)
        final = torch.softmax(widen(forward(images * (~masked).to(images.dtype).view(B, 1, H, W))), 1).gather(1, target[:, None])
    curve[:, last] = final
    # one forward per step (each with a backward) plus the unmasked and the all-masked forward
    return SelectionResult(order, curve, pred, confidence, forward_passes=B * (steps + 2), step_sizes=tuple(sizes))
