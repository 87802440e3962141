"""run_selector: one call for every model selector, by name, with its stored parameters."""

from __future__ import annotations

from typing import Optional

from overinterp.selection.attribution import attribution_selection
from overinterp.selection.backselect import backward_selection
from overinterp.selection.engine import EngineConfig, PassesFunc, SelectionResult
from overinterp.selection.gradient import batched_gradient_sis
from overinterp.selection.params import REMOVAL_SELECTORS, PerturbationParams, check_selector_name, check_selector_params, removal_args
from overinterp.selection.perturbation import meaningful_perturbation


def run_selector(name: str, forward, images, params: dict, engine: EngineConfig = EngineConfig(),
                 on_passes: Optional[PassesFunc] = None) -> SelectionResult:
    """Dispatch to a model selector by name: (B, C, H, W) normalised images -> SelectionResult.

    `params` as `selector_params` makes them (the row's stored parameters). They are checked before
    the model runs (one-line ValueError naming the fix). Every selector explains the prediction on
    the unmasked image and gives each image the same result alone or in any batch. on_passes(n) is
    called as forward passes are made, from inside the batch (see engine.PassesFunc); its calls
    sum to the result's forward_passes.
    """
    check_selector_name(name)
    if name in REMOVAL_SELECTORS:
        k, tail, keep = removal_args(name, params)
        if name == "backselect":
            return backward_selection(forward, images, pixels_per_step=k, exact_tail=tail, keep_fraction=keep, config=engine,
                                      on_passes=on_passes)
        return batched_gradient_sis(forward, images, pixels_per_step=k, exact_tail=tail, keep_fraction=keep, engine=engine,
                                    on_passes=on_passes)
    resolved = check_selector_params(name, params)
    if name == "perturbation":
        seed = resolved.pop("seed")
        return meaningful_perturbation(forward, images, params=PerturbationParams(**resolved), seed=seed, config=engine,
                                       on_passes=on_passes)
    return attribution_selection(forward, images, name, params=resolved, config=engine, on_passes=on_passes)
