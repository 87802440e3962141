"""Backward selection (BS): remove pixels one step at a time, keeping p(c) as high as possible.

For a batch of B images (normalised, (B, C, H, W)) and the class c each is predicted as on the
unmasked image, every step scores each remaining pixel by p(c | image with that pixel also masked)
and removes the best one (ties: lowest pixel index). A masked pixel is 0 on all channels, i.e. the
data set's mean colour. The result is the removal order (B, HW) and the p(c) curve (B, HW).

All images advance in lock-step, so at step t every image has R = HW - t candidates and the B·R
candidate images of a step are built on the model's device and scored in chunks of `chunk`
forward passes. The only host transfer is the final result.

With pixels_per_step = k > 1 (an approximation; k = 1 is exact) the k best-scoring pixels of a step
are removed together; the curve then holds p(c) after the whole step for each of those k removals,
from one extra forward pass of the new masked images. Pixels removed in one step are listed in
ascending pixel index: they left together, so no order among them exists, and this canonical
order is what the Parquet store keeps (it stores the step of each pixel, see overinterp/store/).

With exact_tail = F < 1 the k-steps stop when ceil(F·HW) pixels remain and exact BS (k = 1)
removes the rest: the paper uses only the tail of the order (the 5% subset, an SIS), while the
first steps, which remove pixels that hardly matter, cost most of the passes. `step_plan` gives the
pixels each step removes; `run_steps` walks any plan from any state (Batched Gradient SIS runs its
exact tail with it, gradient.py). Their cost in forward passes is in cost.py; the scorer, chunk
sizing and result type they share are in engine.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from overinterp.selection.cost import fast_stops, tail_pixels
from overinterp.selection.engine import (EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images,
                                        explained_class, score_candidates)
from overinterp.selection.params import check_selector_args


def step_plan(hw: int, pixels_per_step: int, exact_tail: float = 1.0, keep_fraction: float = 1.0) -> list[int]:
    """Pixels removed at each step, in order: the fast steps (k each, shrunk where one would cross
    a fast stop: the kept subset's boundary, then exactly `tail_pixels` remaining; cost.fast_stops),
    then the exact tail (1 each). Sums to hw.

    With F = 1 there is no tail: min(k, remaining) per step to the end. Examples:
    step_plan(10, 4) = [4, 4, 2]; step_plan(10, 4, keep_fraction=0.3) = [4, 3, 3] (3 pixels kept:
    a step ends with 3 remaining).
    """
    n = tail_pixels(hw, exact_tail)
    plan, remaining = [], hw
    for stop in fast_stops(hw, n, keep_fraction):
        q, r = divmod(remaining - stop, pixels_per_step)
        plan += [pixels_per_step] * q + ([r] if r else [])
        remaining = stop
    return plan + [1] * n


def _score_step(scorer: Scorer, x_nhwc: torch.Tensor, remaining: torch.Tensor, target: torch.Tensor, shape,
                on_passes: Optional[PassesFunc] = None) -> torch.Tensor:
    """(B, R) p(c) for every (image, remaining pixel) candidate of one step.

    x_nhwc: (B, HW, C) current masked images; remaining: (B, R) pixel indices, ascending. Each
    candidate gathers its image and zeroes one pixel (all channels) on the device.
    """
    B, R = remaining.shape
    flat_pixel = remaining.reshape(-1)  # (B*R,)

    def build(idx: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        cand = x_nhwc[b]  # (M, HW, C) copy of each candidate's image
        cand[torch.arange(len(idx), device=cand.device), flat_pixel[idx]] = 0.0
        return cand

    dtype = torch.promote_types(x_nhwc.dtype, torch.float32)
    return score_candidates(scorer, B * R, R, shape, target, build, dtype, on_passes).view(B, R)


def backward_selection(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    pixels_per_step: int = 1,
    exact_tail: float = 1.0,
    keep_fraction: float = 1.0,
    config: EngineConfig = EngineConfig(),
    target: Optional[torch.Tensor] = None,
    max_steps: Optional[int] = None,
    on_passes: Optional[PassesFunc] = None,
) -> SelectionResult:
    """Run backward selection on a batch of images until every pixel is masked.

    Args:
        forward, images, target, on_passes: as every selector takes them (engine.py); images keep their dtype.
        pixels_per_step: k pixels removed per step; 1 is exact BS, k > 1 an approximation.
        exact_tail: F in (0, 1]. F < 1: remove k per step until ceil(F·HW) pixels remain (the last
            k-step shrunk to land there), then exact BS (k = 1) to the end. F = 1 (default): k per
            step to the end — bit for bit the selector without this option. See selection/cost.py.
        keep_fraction: the subset the run keeps (--fraction); no k-step crosses its boundary, so the
            subset is whole steps (1: no such stop; no effect at k = 1). See selection/cost.py.
        config: chunking, memory format, autocast and compile (see EngineConfig).
        max_steps: for benchmarks — stop after this many steps; order is -1 and curve NaN beyond.

    Returns:
        SelectionResult with order/curve (B, HW) on the images' device; forward_passes counts the
        images the model evaluated (`planned_forward_passes` gives it in advance).
    """
    check_images(images)
    check_selector_args(pixels_per_step, exact_tail, keep_fraction)
    device = images.device
    B, C, H, W = images.shape
    HW = H * W
    scorer = Scorer(forward, config, images)  # after the input checks: it times forward passes
    order = torch.full((B, HW), -1, dtype=torch.long, device=device)
    curve = torch.full((B, HW), float("nan"), dtype=torch.float32, device=device)
    with torch.inference_mode():
        x = images.permute(0, 2, 3, 1).reshape(B, HW, C).clone()  # (B, HW, C) current masked images
        probs = scorer.probs(scorer.layout(images))
        target, confidence, pred = explained_class(probs, target)
        remaining = torch.arange(HW, device=device).expand(B, HW).clone()  # (B, R) ascending pixel ids
        plan = step_plan(HW, pixels_per_step, exact_tail, keep_fraction)
        passes, sizes = run_steps(scorer, x, remaining, target, order, curve, 0, plan[:max_steps], (C, H, W), on_passes)
    return SelectionResult(order, curve, pred, confidence, passes, sizes)


def run_steps(
    scorer: Scorer,
    x: torch.Tensor,
    remaining: torch.Tensor,
    target: torch.Tensor,
    order: torch.Tensor,
    curve: torch.Tensor,
    removed: int,
    plan: list[int],
    shape: tuple[int, int, int],
    on_passes: Optional[PassesFunc] = None,
) -> tuple[int, tuple[int, ...]]:
    """The BS loop from any state: remove plan[t] pixels at step t, writing order/curve in place.

    x: (B, HW, C) current masked images (updated in place); remaining: (B, R) pixel ids not yet
    masked, ascending, the same count R for every image; removed: HW - R, the position in
    order/curve the next step writes to. A step of 1 is exact BS; a step of k > 1 removes the k
    best-scoring pixels together and re-scores the new images for the curve.
    Returns (images evaluated, the step sizes taken). Call under torch.inference_mode().
    """
    B = x.shape[0]
    C, H, W = shape
    HW = H * W
    rows = torch.arange(B, device=x.device)[:, None]
    passes = 0
    for k in plan:
        R = HW - removed
        scores = _score_step(scorer, x, remaining, target, shape, on_passes)  # (B, R)
        passes += B * R
        if k == 1:
            best_score, pos = scores.max(1, keepdim=True)  # first max = lowest pixel id (ascending)
        else:
            # stable descending sort keeps equal scores in ascending pixel order; the step's k
            # pixels are then listed by position (= ascending pixel id), the canonical order
            pos = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(1).values
        chosen = remaining.gather(1, pos)  # (B, k) pixel ids
        x[rows, chosen] = 0.0
        order[:, removed : removed + k] = chosen
        if k == 1:
            curve[:, removed : removed + 1] = best_score
        else:
            imgs = x.view(B, H, W, C).permute(0, 3, 1, 2)
            curve[:, removed : removed + k] = scorer.target_probs(imgs, target)[:, None]
            passes += B
            if on_passes is not None:
                on_passes(B)
        keep = torch.ones_like(remaining, dtype=torch.bool).scatter_(1, pos, False)
        remaining = remaining[keep].view(B, R - k)  # boolean gather preserves ascending order
        removed += k
    return passes, tuple(plan)
