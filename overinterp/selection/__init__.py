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


__all__ = [
    "EngineConfig", "SelectionResult", "backward_selection", "brute_force_backward_selection",
    "NO_SIS", "apply_mask", "keep_mask", "n_keep", "random_order", "sis_mask", "sis_size", "tail_mask",
    "SELECTORS", "selector_tag", "params_json",
]
