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

With exact_tail = F < 1 the gradient steps stop when ceil(F·HW) pixels remain and the BS engine
(backselect.run_steps) finishes exactly, one pixel per step: the last ceil(F·HW) removals — the
part of the order an SIS or a pixel subset is made of — are exact backward selection from the
state the gradient steps left. Cost in selection/cost.py.

Precision: the gradient steps run in the device's default precision (on Ampere and newer GPUs cuDNN
convolutions use TF32), so where two pixels' gradients nearly tie a GPU may mask them in another
step than the CPU; the exact tail scores in strict fp32 (engine.exact_fp32). Under exact_fp32 the
whole order matches the CPU's (benchmarks/gpu_check.py, BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from overinterp.selection.backselect import run_steps, step_plan
from overinterp.selection.cost import tail_pixels
from overinterp.selection.engine import (EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images,
                                        explained_class, widen)
from overinterp.selection.params import check_selector_args


def batched_gradient_sis(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    pixels_per_step: int = 100,
    exact_tail: float = 1.0,
    keep_fraction: float = 1.0,
    engine: EngineConfig = EngineConfig(),
    target: Optional[torch.Tensor] = None,
    max_steps: Optional[int] = None,
    on_passes: Optional[PassesFunc] = None,
) -> SelectionResult:
    """Run Batched Gradient SIS until every pixel is masked.

    Args:
        forward, images, target: as every selector takes them (engine.py).
        pixels_per_step: k pixels masked per step.
        exact_tail: F in (0, 1]. F < 1: gradient steps until ceil(F·HW) pixels remain (the last
            one shrunk to land there), then exact backward selection on those pixels (the BS
            engine, one pixel per step) to the end. F = 1 (default): gradient steps to the end.
        keep_fraction: the subset the run keeps (--fraction); no gradient step crosses its boundary,
            so the subset is whole steps (1: no such stop). See selection/cost.py.
        engine: how the exact tail runs (chunking, memory format; see EngineConfig). Unused at F = 1.
        max_steps: for benchmarks — stop after this many steps, gradient and exact together
            (order -1 / curve NaN beyond).
        on_passes: called with the forward passes made, per gradient step (B) and per chunk of the
            exact tail (see engine.PassesFunc); backward passes are not reported.
    Returns:
        SelectionResult: order (B, HW), curve (B, HW) with p(c) after the step each pixel was
        masked in; forward_passes = images x (gradient steps + 1) + the exact tail's candidates,
        backward_passes = images x gradient steps (selection/cost.py gives both in advance).
    """
    check_images(images)
    check_selector_args(pixels_per_step, exact_tail, keep_fraction)
    B, C, H, W = images.shape
    HW = H * W
    device = images.device
    full_plan = step_plan(HW, pixels_per_step, exact_tail, keep_fraction)
    n_gradient = len(full_plan) - tail_pixels(HW, exact_tail)  # the tail's steps are one pixel each
    plan = full_plan[:max_steps]
    gradient_plan, tail_plan = plan[:n_gradient], plan[n_gradient:]
    with torch.no_grad():
        probs = torch.softmax(widen(forward(images)), 1)
    target, confidence, pred = explained_class(probs, target)
    masked = torch.zeros(B, HW, dtype=torch.bool, device=device)
    order = torch.full((B, HW), -1, dtype=torch.long, device=device)
    curve = torch.full((B, HW), float("nan"), dtype=torch.float32, device=device)
    removed, last = 0, slice(0, 0)
    for k in gradient_plan:
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
        if on_passes is not None:
            on_passes(B)
    steps = len(gradient_plan)
    passes = B * steps
    if steps:
        with torch.no_grad():  # p(c) after the last gradient step (everything masked, without a tail)
            after = torch.softmax(widen(forward(images * (~masked).to(images.dtype).view(B, 1, H, W))), 1).gather(1, target[:, None])
        curve[:, last] = after
        passes += B
        if on_passes is not None:
            on_passes(B)
    if tail_plan:
        # the exact tail: the BS engine from this state, scoring only the pixels still visible
        scorer = Scorer(forward, engine, images)
        with torch.inference_mode():
            x = (images * (~masked).to(images.dtype).view(B, 1, H, W)).permute(0, 2, 3, 1).reshape(B, HW, C).clone()  # (B, HW, C)
            remaining = torch.arange(HW, device=device).expand(B, HW)[~masked].view(B, HW - removed)  # (B, R) ascending
            tail_passes, _ = run_steps(scorer, x, remaining, target, order, curve, removed, tail_plan, (C, H, W), on_passes)
        passes += tail_passes
    return SelectionResult(order, curve, pred, confidence, forward_passes=passes, step_sizes=tuple(plan), backward_passes=B * steps)
