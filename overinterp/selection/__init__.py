"""Pixel selection: which pixels of an image a model's prediction rests on.

Selectors, each named with its parameters in the Parquet store (see `selector_tag`):
- "backselect" — exact backward selection (k = 1) or k pixels per step (backselect.py);
- "random" — a seeded random subset, the paper's baseline (subsets.py);
- "bgsis" — Batched Gradient SIS for large images (gradient.py);
- ranking selectors, which order pixels by an importance map and then compute the p(c) curve of
  that order (ranking.py): "perturbation" (meaningful perturbation, perturbation.py), "gradient",
  "ig", "occlusion" and any Captum class as "captum:<ClassName>" (attribution.py).
backselect and bgsis take `exact_tail` = F: the fast rule until ceil(F·HW) pixels remain, exact
backward selection for the rest (cost.py: the step plan and its forward passes, in closed form).
"""

from __future__ import annotations

import json
import re
from typing import Optional

from overinterp.selection.attribution import (
    ATTRIBUTION_METHODS,
    CAPTUM_PREFIX,
    attribution_selection,
    check_selector_params,
    selector_tag_params,
)
from overinterp.selection.backselect import (
    EngineConfig,
    PassesFunc,
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
from overinterp.selection.perturbation import PerturbationParams, meaningful_perturbation
from overinterp.selection.subsets import NO_SIS, apply_mask, keep_mask, n_keep, random_order, sis_mask, sis_size, tail_mask

REMOVAL_SELECTORS = ("backselect", "bgsis")  # remove pixels step by step (take k and the exact tail)
RANKING_SELECTORS = ("perturbation",) + ATTRIBUTION_METHODS  # rank once, then the curve of the ranking
MODEL_SELECTORS = REMOVAL_SELECTORS + RANKING_SELECTORS  # the selectors that explain a model; also captum:<ClassName>
SELECTORS = MODEL_SELECTORS + ("random",)


def is_model_selector(name: str) -> bool:
    return name in MODEL_SELECTORS or (isinstance(name, str) and name.startswith(CAPTUM_PREFIX))


def check_selector_name(name: str) -> None:
    """One-line ValueError unless `name` is a model selector (a captum:<ClassName> must exist)."""
    if not is_model_selector(name):
        raise ValueError(f"unknown selector {name!r}: choose from {', '.join(MODEL_SELECTORS)} "
                         f"or {CAPTUM_PREFIX}<ClassName> (a class of captum.attr)")
    if name.startswith(CAPTUM_PREFIX):
        check_selector_params(name, {})


def _tag_value(v) -> str:
    """A parameter value as it appears in a path-safe tag: numbers and words as they are, lists
    compact; anything outside [A-Za-z0-9._,+=] becomes '_'."""
    text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._,+=]", "_", text)


def selector_tag(name: str, params: dict) -> str:
    """A short, path-safe name for a selector with its parameters, so that runs never mix.

    backselect (exact), backselect-k4, backselect-k16-tail0.1, bgsis-k100, bgsis-k100-tail0.05,
    random-seed0, gradient, ig-n50, occlusion-window3, perturbation-it300, captum_InputXGradient.
    A tail of 1 (off) is left out, so tags from before the exact tail stay valid; backselect with
    k = 1 is exact whatever its tail (every step removes one pixel): "backselect". Ranking
    selectors carry their short parameters (`selector_tag_params`).
    """
    if name == "random" or name in REMOVAL_SELECTORS:
        params = {key: v for key, v in params.items() if not (key == "tail" and v == 1)}
        if name == "backselect" and params.get("k", 1) == 1:
            return "backselect"
        return name + "".join(f"-{k}{v}" for k, v in sorted(params.items()))
    check_selector_name(name)
    short = selector_tag_params(name, params)
    return name.replace(":", "_") + "".join(f"-{k}{_tag_value(v)}" for k, v in sorted(short.items()))


def selector_params(name: str, pixels_per_step: int = 1, exact_tail: float = 1.0, options: dict | None = None) -> dict:
    """The parameters a model selector's rows are stored with (and tagged by, see selector_tag).

    backselect / bgsis: {"k": k}, plus {"tail": F} when F < 1 (`options` must be empty). Ranking
    selectors: their resolved parameters (defaults filled in from `options`). Validates everything
    before any model work (one-line ValueError naming the fix).
    """
    check_selector_name(name)
    if name in REMOVAL_SELECTORS:
        if options:
            raise ValueError(f"{name} takes --pixels-per-step and --exact-tail, not {', '.join(sorted(options))}")
        check_selector_args(pixels_per_step, exact_tail)
        params = {"k": int(pixels_per_step)}
        if exact_tail < 1:
            params["tail"] = float(exact_tail)
        return params
    return check_selector_params(name, options)


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True)

# The exact tail stays off by default (exact BS when k = 1). BENCHMARKS.md, "Exact tail: fidelity vs
# cost" (2026-11-23, 32x32 digits): no (F, k) had >= 10x fewer passes *and* a mean 5%-subset
# Jaccard >= 0.95 against exact BS — the best at >= 10x, k = 16 with F = 0.1, is 0.44 (two exact BS
# runs, float32 and float64, share 0.62) — so nothing earns the default.
DEFAULT_EXACT_TAIL = 1.0


def run_selector(name: str, forward, images, params: dict, engine: EngineConfig = EngineConfig(),
                 on_passes: Optional[PassesFunc] = None) -> SelectionResult:
    """Dispatch to a model selector by name: (B, C, H, W) normalised images -> SelectionResult.

    `params` as `selector_params` makes them (the row's stored parameters). They are checked before
    the model runs (one-line ValueError naming the fix). Every selector explains the prediction on
    the unmasked image and gives each image the same result alone or in any batch. on_passes(n) is
    called as forward passes are made, from inside the batch (see backselect.PassesFunc); its calls
    sum to the result's forward_passes.
    """
    check_selector_name(name)
    if name in REMOVAL_SELECTORS:
        k, tail = params.get("k", 1), params.get("tail", 1.0)
        check_selector_args(k, tail)
        if name == "backselect":
            return backward_selection(forward, images, pixels_per_step=k, exact_tail=tail, config=engine, on_passes=on_passes)
        return batched_gradient_sis(forward, images, pixels_per_step=k, exact_tail=tail, engine=engine, on_passes=on_passes)
    resolved = check_selector_params(name, params)
    if name == "perturbation":
        seed = resolved.pop("seed")
        return meaningful_perturbation(forward, images, params=PerturbationParams(**resolved), seed=seed, config=engine,
                                       on_passes=on_passes)
    return attribution_selection(forward, images, name, params=resolved, config=engine, on_passes=on_passes)


__all__ = [
    "EngineConfig", "SelectionResult", "backward_selection", "brute_force_backward_selection",
    "NO_SIS", "apply_mask", "keep_mask", "n_keep", "random_order", "sis_mask", "sis_size", "tail_mask",
    "SELECTORS", "MODEL_SELECTORS", "REMOVAL_SELECTORS", "RANKING_SELECTORS", "is_model_selector", "check_selector_name",
    "DEFAULT_EXACT_TAIL", "selector_tag", "selector_params", "params_json", "run_selector", "batched_gradient_sis",
    "check_selector_args", "planned_forward_passes", "planned_backward_passes", "planned_steps", "step_plan", "tail_pixels",
]
