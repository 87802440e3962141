"""Pixel selection: which pixels of an image a model's prediction rests on.

Selectors, each named with its parameters in the Parquet store (see `selector_tag`):
- "backselect" — exact backward selection (k = 1) or k pixels per step (backselect.py);
- "random" — a seeded random subset, the paper's baseline (subsets.py);
- "bgsis" — Batched Gradient SIS for large images (gradient.py).
Both model selectors take `exact_tail` = F: the fast rule until ceil(F·HW) pixels remain, exact
backward selection for the rest (cost.py: the step plan and its forward passes, in closed form).
"""

from __future__ import annotations

import json

from overinterp.selection.backselect import (
    EngineConfig,
    SelectionResult,
    backward_selection,
    brute_force_backward_selection,
)
from overinterp.selection.cost import (
    check_selector_args,
    planned_backward_passes,
    planned_forward_passes,
    planned_steps,
    step_plan,
    tail_pixels,
)
from overinterp.selection.gradient import batched_gradient_sis
from overinterp.selection.subsets import NO_SIS, apply_mask, keep_mask, n_keep, random_order, sis_mask, sis_size, tail_mask

SELECTORS = ("backselect", "random", "bgsis")


def selector_tag(name: str, params: dict) -> str:
    """A short, path-safe name for a selector with its parameters, so that runs never mix.

    backselect (exact), backselect-k4, backselect-k16-tail0.1, bgsis-k100, bgsis-k100-tail0.05,
    random-seed0. A tail of 1 (off) is left out, so tags from before the exact tail stay valid;
    backselect with k = 1 is exact whatever its tail (every step removes one pixel): "backselect".
    """
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}: choose one of {', '.join(SELECTORS)}")
    params = {key: v for key, v in params.items() if not (key == "tail" and v == 1)}
    if name == "backselect" and params.get("k", 1) == 1:
        return "backselect"
    return name + "".join(f"-{k}{v}" for k, v in sorted(params.items()))


def selector_params(name: str, pixels_per_step: int, exact_tail: float = 1.0) -> dict:
    """The parameters a model selector's rows are stored with (and tagged by, see selector_tag):
    {"k": k}, plus {"tail": F} when F < 1. Validates k and F (one-line ValueError)."""
    check_selector_args(pixels_per_step, exact_tail)
    params = {"k": int(pixels_per_step)}
    if exact_tail < 1:
        params["tail"] = float(exact_tail)
    return params


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


MODEL_SELECTORS = ("backselect", "bgsis")  # the selectors that explain a model (random needs none)

# The exact tail stays off by default (exact BS when k = 1). BENCHMARKS.md, "Exact tail: fidelity vs
# cost" (2026-11-23, 32x32 digits): no (F, k) had >= 10x fewer passes *and* a mean 5%-subset
# Jaccard >= 0.95 against exact BS — the best at >= 10x, k = 16 with F = 0.1, is 0.44 (two exact BS
# runs, float32 and float64, share 0.62) — so nothing earns the default.
DEFAULT_EXACT_TAIL = 1.0


def run_selector(name: str, forward, images, pixels_per_step: int, engine: EngineConfig = EngineConfig(),
                 exact_tail: float = 1.0) -> SelectionResult:
    """Dispatch to a model selector by name: (B, C, H, W) normalised images -> SelectionResult.

    k and F are checked before the model runs (one-line ValueError naming the fix).
    """
    if name not in MODEL_SELECTORS:
        raise ValueError(f"unknown model selector {name!r}: choose one of {', '.join(MODEL_SELECTORS)}")
    check_selector_args(pixels_per_step, exact_tail)
    if name == "backselect":
        return backward_selection(forward, images, pixels_per_step=pixels_per_step, exact_tail=exact_tail, config=engine)
    return batched_gradient_sis(forward, images, pixels_per_step=pixels_per_step, exact_tail=exact_tail, engine=engine)


__all__ = [
    "EngineConfig", "SelectionResult", "backward_selection", "brute_force_backward_selection",
    "NO_SIS", "apply_mask", "keep_mask", "n_keep", "random_order", "sis_mask", "sis_size", "tail_mask",
    "SELECTORS", "MODEL_SELECTORS", "DEFAULT_EXACT_TAIL", "selector_tag", "selector_params", "params_json", "run_selector", "batched_gradient_sis",
    "check_selector_args", "planned_forward_passes", "planned_backward_passes", "planned_steps", "step_plan", "tail_pixels",
]
