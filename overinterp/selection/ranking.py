"""From a pixel ranking to a selection result: one p(c) curve for every selector.

Selectors that only rank pixels (meaningful perturbation, gradient, integrated gradients,
occlusion, ...) give an importance score per pixel. The removal order is the pixels sorted by
importance, least important first, ties to the lowest pixel index (a stable sort), and the curve
is p(c) with the first t+1 pixels of that order masked, for every t — the same quantity backward
selection records after each removal, so SIS at tau, keep-masks and every report work unchanged.

The curve's B·HW candidates (one per prefix of each order) are built on the model's device from
the pixels' ranks and scored in chunks like backward selection's (engine.score_candidates).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from overinterp.selection.engine import (EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images, explained_class,
                                        ranks, score_candidates)


def order_from_importance(importance: torch.Tensor) -> torch.Tensor:
    """(B, HW) importance -> (B, HW) int64 removal order, least important first.

    A stable ascending sort: equal scores keep ascending pixel order (ties to the lowest index).
    """
    return torch.sort(importance, dim=1, stable=True).indices


def _curve(scorer: Scorer, images: torch.Tensor, order: torch.Tensor, target: torch.Tensor,
           on_passes: Optional[PassesFunc] = None) -> torch.Tensor:
    """(B, HW) float32 p(target) with the first t+1 pixels of `order` masked, for every t."""
    B, C, H, W = images.shape
    HW = H * W
    rank = ranks(order.to(images.device))  # (B, HW)
    x = images.permute(0, 2, 3, 1).reshape(B, HW, C)  # (B, HW, C) view, NHWC

    def build(idx: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        keep = rank[b] > (idx - b * HW)[:, None]  # (M, HW) bool: candidate t masks the first t+1 pixels of the order
        return x[b] * keep[..., None].to(x.dtype)  # (M, HW, C): masked pixels are 0 on all channels

    with torch.inference_mode():
        return score_candidates(scorer, B * HW, HW, (C, H, W), target, build, torch.float32, on_passes).view(B, HW)


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
        forward, images: as every selector takes them (engine.py).
        order: (B, HW) int64 removal order, earliest first (a permutation per row).
        target: (B,) class whose probability is tracked.
        chunk: candidates per forward pass; overrides config.chunk (None: autotuned within the
            memory budget, see EngineConfig).
    Returns:
        curve (B, HW) float32 on the images' device; B·HW forward passes.
    """
    scorer = _checked_scorer(forward, images, order, "order", chunk, config)
    return _curve(scorer, images, order, target.to(images.device).long())


def _checked_scorer(forward: ForwardFunc, images: torch.Tensor, per_pixel: torch.Tensor, name: str, chunk: Optional[int],
                    config: EngineConfig) -> Scorer:
    """The Scorer of a public entry point, once images and the (B, HW) tensor `name` are checked."""
    check_images(images)
    B, C, H, W = images.shape
    if per_pixel.shape != (B, H * W):
        raise ValueError(f"{name} must be (B, HW) = {(B, H * W)}, got {tuple(per_pixel.shape)}")
    return Scorer(forward, config if chunk is None else dataclasses.replace(config, chunk=chunk), images)


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
        forward, images, target: as every selector takes them (engine.py).
        importance: (B, HW) scores, higher = more important (removed later); ties are removed in
            ascending pixel order.
        forward_passes: images the selector already evaluated to get the scores; the curve's
            B·HW passes are added (the unmasked prediction is not counted, as in backward selection).
        chunk / config: how the curve's candidates are batched (see `ranking_curve`).
    Returns:
        SelectionResult on the images' device, step_sizes = (1,) * HW (each removal is its own step).
    """
    scorer = _checked_scorer(forward, images, importance, "importance", chunk, config)
    return scored_result(scorer, images, importance, explain(scorer, images, target), forward_passes)
