"""Pixel selection: which pixels of an image a model's prediction rests on.

Selectors, each named with its parameters in the Parquet store (see `selector_tag`):
- "backselect" — exact backward selection (k = 1) or k pixels per step (backselect.py);
- "random" — a seeded random subset, the paper's baseline (subsets.py);
- "bgsis" — Batched Gradient SIS for large images (gradient.py).
"""

from __future__ import annotations

import json

from overinterp.selection.backselect import (
    EngineConfig,
    SelectionResult,
    backward_selection,
    brute_force_backward_selection,
)
from overinterp.selection.gradient import batched_gradient_sis
from overinterp.selection.subsets import NO_SIS, apply_mask, keep_mask, n_keep, random_order, sis_mask, sis_size, tail_mask

SELECTORS = ("backselect", "random", "bgsis")


def selector_tag(name: str, params: dict) -> str:
    """A short, path-safe name for a selector with its parameters: backselect, backselect-k4, random-seed0."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}: choose one of {', '.join(SELECTORS)}")
    if name == "backselect" and params.get("k", 1) == 1:
        return "backselect"
    return name + "".join(f"-{k}{v}" for k, v in sorted(params.items()))


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


MODEL_SELECTORS = ("backselect", "bgsis")  # the selectors that explain a model (random needs none)


def run_selector(name: str, forward, images, pixels_per_step: int, engine: EngineConfig = EngineConfig()) -> SelectionResult:
    """Dispatch to a model selector by name: (B, C, H, W) normalised images -> SelectionResult."""
    if name == "backselect":
        return backward_selection(forward, images, pixels_per_step=pixels_per_step, config=engine)
    if name == "bgsis":
        return batched_gradient_sis(forward, images, pixels_per_step=pixels_per_step)
    raise ValueError(f"unknown model selector {name!r}: choose one of {', '.join(MODEL_SELECTORS)}")


__all__ = [
    "EngineConfig", "SelectionResult", "backward_selection", "brute_force_backward_selection",
    "NO_SIS", "apply_mask", "keep_mask", "n_keep", "random_order", "sis_mask", "sis_size", "tail_mask",
    "SELECTORS", "MODEL_SELECTORS", "selector_tag", "params_json", "run_selector", "batched_gradient_sis",
]
