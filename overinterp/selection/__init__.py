"""Pixel selection: which pixels of an image a model's prediction rests on.

Each selector's rows are named in the Parquet store by its name and parameters (`selector_tag`);
params.py holds the one list of selectors and says which module implements each.

Layout, each module importing only those above it:
- params.py — the one list of selectors, their names, parameters, k/F/fraction checks and store tags (no torch);
- cost.py — the passes each selector plans, in closed form, and the pixel counts they rest on (no torch);
- engine.py — what the engines share: SelectionResult, EngineConfig, the Scorer and its chunk sizing;
- backselect.py, gradient.py, ranking.py, attribution.py, perturbation.py — one per selector;
- dispatch.py — run_selector, every model selector by name;
- subsets.py — from an order to pixel subsets (SIS, keep-masks, random orders).

The names of params.py and cost.py are imported here at once; the rest (torch) on first use, so
that configuration and planning import `overinterp.selection` without loading torch.
"""

from __future__ import annotations

import importlib

from overinterp.selection.cost import n_keep, planned_backward_passes, planned_forward_passes, planned_passes, planned_steps, tail_pixels
from overinterp.selection.params import (
    ATTRIBUTION_METHODS, CAPTUM_PREFIX, DEFAULT_EXACT_TAIL, MODEL_SELECTORS, RANDOM, RANKING_SELECTORS, REMOVAL_SELECTORS, SELECTORS,
    PerturbationParams, check_selector_args, check_selector_name, check_selector_params, is_model_selector, params_json,
    selector_params, selector_tag, selector_tag_params,
)

# name -> the module that defines it, imported on first access (these modules import torch)
_LAZY = {
    **dict.fromkeys(("EngineConfig", "PassesFunc", "SelectionResult"), "engine"),
    **dict.fromkeys(("backward_selection", "step_plan"), "backselect"),
    "batched_gradient_sis": "gradient",
    "attribution_selection": "attribution",
    "meaningful_perturbation": "perturbation",
    "run_selector": "dispatch",
    **dict.fromkeys(("NO_SIS", "apply_mask", "keep_mask", "random_order", "sis_mask", "sis_size", "tail_mask"),
                    "subsets"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

