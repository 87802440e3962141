"""From a pixel ranking to a selection result: one p(c) curve for every selector.

Selectors that only rank pixels (meaningful perturbation, gradient, integrated gradients,
occlusion, ...) give an importance score per pixel. The removal order is the pixels sorted by
importance, least important first, ties to the lowest pixel index (a stable sort), and the curve
is p(c) with the first t+1 pixels of that order masked, for every t — the same quantity backward
selection records after each removal, so SIS at tau, keep-masks and every report work unchanged.

Cost: HW forward passes per image (one per prefix of the order), batched like backward
selection: the B·HW candidates are built on the model's device from the pixels' ranks
(pixel j is masked in candidate t iff rank[j] < t + 1) and scored in chunks sized to memory
(engine.py's `Scorer`). Nothing leaves the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from overinterp.selection.engine import (EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images, explained_class,
                                        ranks)


def order_from_importance(importance: torch.Tensor) -> torch.Tensor:
    """(B, HW) importance -> (B, HW) int64 removal order, least important first.

    A stable ascending sort: equal scores keep ascending pixel order (ties to the lowest index).
    """
    return torch.sort(importance, dim=1, stable=True).indices


def _curve(scorer: Scorer, images: torch.Tensor, order: torch.Tensor, target: torch.Tensor,
           on_passes: Optional[PassesFunc] = None) -> torch.Tensor:
    B, C, H, W = images.shape
    HW = H * W
    device = images.device
    rank = ranks(order.to(device))  # (B, HW)
    x = images.permute(0, 2, 3, 1).reshape(B, HW, C)  # (B, HW, C) view, NHWC
    n = B * HW
    curve = torch.empty(n, device=device, dtype=torch.float32)
    # balanced chunks (as in backward selection); a compiled model keeps its one static size
    size = scorer.chunk if scorer.config.compile else math.ceil(n / math.ceil(n / scorer.chunk))
    with torch.inference_mode():
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n), device=device)
            b = torch.div(idx, HW, rounding_mode="floor")  # image of each candidate
            t = idx - b * HW  # candidate t masks the first t+1 pixels of the order
            keep = rank[b] > t[:, None]  # (M, HW) bool
            cand = x[b] * keep[..., None].to(x.dtype)  # (M, HW, C): masked pixels are 0 on all channels
            imgs = cand.view(-1, H, W, C).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
            if not scorer.config.channels_last:
                imgs = imgs.contiguous()
            curve[start : start + len(idx)] = scorer.target_probs(imgs, target[b]).float()
            if on_passes is not None:
                on_passes(len(idx))
    return curve.view(B, HW)


def ranking_curve(
    forward: ForwardFunc,
    images: torch.Tensor,
    order: torch.Tensor,
    target: torch.Tensor,
    *,
    chunk: Optional[int] = None,
    config: EngineConfig = EngineConfig(),
) -> torch.Tensor:
    """p(target) with the first t+1 pixels of `order` masked, for every t: (B, HW) float32.

    Args:
        forward: model in eval mode on the images' device, (N, C, H, W) -> logits (N, K).
        images: (B, C, H, W) normalised floats; a masked pixel is 0 on all channels.
        order: (B, HW) int64 removal order, earliest first (a permutation per row).
        target: (B,) class whose probability is tracked.
        chunk: candidates per forward pass; overrides config.chunk (None: autotuned within the
            memory budget, see EngineConfig).
    Returns:
        curve (B, HW) float32 on the images' device; B·HW forward passes.
    """
    check_images(images)
    B, C, H, W = images.shape
    if order.shape != (B, H * W):
        raise ValueError(f"order must be (B, HW) = {(B, H * W)}, got {tuple(order.shape)}")
    if chunk is not None:
        config = dataclasses.replace(config, chunk=chunk)
    scorer = Scorer(forward, config, images)
    return _curve(scorer, images, order, target.to(images.device).long())


def explain(scorer: Scorer, images: torch.Tensor, target: Optional[torch.Tensor]):
    """(target, confidence, pred) on the unmasked images: B forward passes, not counted."""
    with torch.inference_mode():
        probs = scorer.probs(scorer.layout(images))
    target, confidence, pred = explained_class(probs, target)
    return target, confidence.float(), pred


def scored_result(scorer: Scorer, images: torch.Tensor, importance: torch.Tensor, explained, forward_passes: int,
                  on_passes: Optional[PassesFunc] = None) -> SelectionResult:
    """The result for (B, HW) importance scores, given `explain`'s (target, confidence, pred);
    on_passes hears of the curve's passes per chunk (the caller reported the ranking's own)."""
    B, C, H, W = images.shape
    target, confidence, pred = explained
    order = order_from_importance(importance.to(images.device))
    curve = _curve(scorer, images, order, target, on_passes)
    return SelectionResult(order, curve, pred, confidence, forward_passes + B * H * W, (1,) * (H * W))


def result_from_scores(
    forward: ForwardFunc,
    images: torch.Tensor,
    importance: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    forward_passes: int = 0,
    chunk: Optional[int] = None,
    config: EngineConfig = EngineConfig(),
) -> SelectionResult:
    """Turn per-pixel importance scores into a SelectionResult: order, p(c) curve, prediction.

    Args:
        forward: model in eval mode on the images' device, (N, C, H, W) -> logits (N, K).
        images: (B, C, H, W) normalised floats.
        importance: (B, HW) scores, higher = more important (removed later); ties are removed in
            ascending pixel order.
        target: (B,) class to explain; default the prediction on the unmasked image.
        forward_passes: images the selector already evaluated to get the scores; the curve's
            B·HW passes are added (the unmasked prediction is not counted, as in backward selection).
        chunk / config: how the curve's candidates are batched (see `ranking_curve`).
    Returns:
        SelectionResult on the images' device, step_sizes = (1,) * HW (each removal is its own step).
    """
    check_images(images)
    B, C, H, W = images.shape
    if importance.shape != (B, H * W):
        raise ValueError(f"importance must be (B, HW) = {(B, H * W)}, got {tuple(importance.shape)}")
    if chunk is not None:
        config = dataclasses.replace(config, chunk=chunk)
    scorer = Scorer(forward, config, images)
    return scored_result(scorer, images, importance, explain(scorer, images, target), forward_passes)
