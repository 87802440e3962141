"""What a selector costs before it runs: the steps it takes and the images the model will evaluate.

Pure arithmetic (no torch; names and parameters are checked and resolved by params.py), for
anything that plans a run (costplan.py: passes and an ETA) and for the engine's step plan
(backselect.step_plan, which stops the fast steps where `fast_stops` says). Every named selector of
params.SELECTORS has a formula; captum:<ClassName> has none. The counts here equal the engines'
counters exactly (tests/test_cost.py checks them against `SelectionResult.forward_passes` /
`backward_passes`, and counts the ranking selectors' backward passes itself).

The exact tail (`exact_tail` = F in (0, 1]): a fast rule removes pixels until ceil(F·HW) remain
(never fewer than 1; the last fast step is shrunk so it stops exactly there), then exact backward
selection (one pixel per step, every remaining pixel scored) removes the rest. F = 1 turns the tail
off: the selector runs its own rule to the end, exactly as without this option — exact BS for
backselect with k = 1, k pixels per step or gradient steps otherwise. (So F = 1 means "no switch",
not "all exact": an exact run is backselect with k = 1, whatever F.)

The kept fraction (`keep_fraction`, the run's --fraction): a fast step never crosses the boundary of
the subset the run keeps, ceil(fraction·HW) pixels remaining; the step that would is shrunk to end
there, and the fast steps go on from it. The kept subset is then whole steps, every pixel of it
chosen by the selector: cut inside a step, the subset would take that step's pixels by position
(a step lists its pixels by pixel id), a bias towards the image's bottom rows. This costs at most
one step more, and nothing when the boundary falls on a step's end or inside the exact tail, or
when k = 1.

Forward passes count images the model evaluates for the selection, beyond the one prediction on
each unmasked image that every selector makes first (to know the class c it explains); the chunk
autotuner's timing runs are not counted either. Per image:
- backselect: every remaining pixel's candidate at every step, plus one re-score of the new masked
  image after each step that removed more than one pixel (its p(c) for the curve). Exact BS:
  HW + (HW - 1) + ... + 1 = HW(HW + 1)/2 (524,800 at 32×32).
- bgsis: one forward (with one backward) per gradient step, plus one forward of the state after
  the last gradient step (its p(c) for the curve); then the exact tail's candidates, n(n + 1)/2.
- the ranking selectors (attribution.py, perturbation.py) rank once, then score the HW prefixes of
  their order (the p(c) curve, HW passes): gradient 1 + HW (one forward with a backward);
  ig n_steps + HW (n_steps interpolated images, each back-propagated); occlusion with window w
  1 + (H − w + 1)(W − w + 1) + HW (the unoccluded image and one per window position, no backward);
  perturbation iterations + 1 + HW (each Adam step a forward with a backward, then the final mask).
  Their engines count a pass with a backward once, in forward_passes, and report backward_passes
  0; `planned_backward_passes` gives the backward passes they really run (tests/test_cost.py
  counts them with a gradient hook), which an ETA needs.
"""

from __future__ import annotations

import math
import numbers

from overinterp.selection.params import (
    CAPTUM_PREFIX,
    RANDOM,
    RANKING_SELECTORS,
    REMOVAL_SELECTORS,
    SELECTORS,
    check_selector_args,
    check_selector_params,
    removal_args,
)


def tail_pixels(hw: int, exact_tail: float) -> int:
    """Pixels the exact tail removes: ceil(F·HW), at least 1, for F < 1; 0 for F = 1 (no tail).

    The 1e-9 guards float products such as 0.1 · 1000 = 100.00000000000001 (-> 100, not 101).
    """
    if exact_tail >= 1.0:
        return 0
    return min(hw, max(1, math.ceil(exact_tail * hw - 1e-9)))


def n_keep(fraction: float, hw: int) -> int:
    """Pixels a subset keeps: ceil(fraction · HW), 52 of 1,024 at the paper's 5% (1e-9 as in tail_pixels)."""
    return math.ceil(fraction * hw - 1e-9)


def fast_stops(hw: int, tail: int, keep_fraction: float = 1.0) -> tuple[int, ...]:
    """Pixels remaining where fast steps must end, in the order reached: the kept subset's boundary
    when it falls among the fast steps (above the tail, below HW), then the tail's start."""
    boundary = n_keep(keep_fraction, hw)
    return (boundary, tail) if tail < boundary < hw else (tail,)


def _fast_phase(hw: int, k: int, n: int, keep_fraction: float = 1.0) -> tuple[int, int, int]:
    """(steps, candidates per image, steps removing more than one pixel) of the fast phase that
    takes hw pixels down to n remaining, k per step, each stretch up to a fast stop ending with a
    shrunk step."""
    steps = candidates = multi = 0
    remaining = hw
    for stop in fast_stops(hw, n, keep_fraction):
        q, r = divmod(remaining - stop, k)
        candidates += q * remaining - k * q * (q - 1) // 2 + (remaining - q * k if r else 0)  # sum of remaining before each step
        multi += (q if k > 1 else 0) + (1 if r > 1 else 0)
        steps += q + (1 if r else 0)
        remaining = stop
    return steps, candidates, multi


def _check_plan_args(selector: str, hw, pixels_per_step: int, exact_tail: float, batch: int, keep_fraction: float = 1.0) -> tuple[int, int]:
    """Validate the arguments of the planners; return the image's (H, W), H = 1 when given as HW."""
    if isinstance(selector, str) and selector.startswith(CAPTUM_PREFIX):
        raise ValueError(f"no cost formula for {selector}: its internal passes depend on the Captum method; time a few images "
                         f"instead, or plan one of {', '.join(SELECTORS)}")
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}: choose one of {', '.join(SELECTORS)}")
    size = tuple(hw) if isinstance(hw, (tuple, list)) else (1, hw)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in size):
        raise ValueError(f"hw must be an integer >= 1 (pixels per image, H·W) or a pair (H, W), got {hw!r}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0:
        raise ValueError(f"batch must be an integer >= 0 (images), got {batch!r}")
    check_selector_args(pixels_per_step, exact_tail, keep_fraction)
    return int(size[0]), int(size[1])


def _ranking_passes(selector: str, size: tuple[int, int], params, given_as_hw: bool) -> tuple[int, int]:
    """(forward, backward) passes per image of a ranking selector (see the module docstring)."""
    p = check_selector_params(selector, params)  # resolved with the defaults; one-line ValueError
    H, W = size
    curve = H * W
    if selector == "gradient":
        return 1 + curve, 1
    if selector == "ig":
        return p["n_steps"] + curve, p["n_steps"]
    if selector == "perturbation":
        return p["iterations"] + 1 + curve, p["iterations"]
    w = p["window"]  # occlusion
    if w > 1 and given_as_hw:
        raise ValueError(f"occlusion with window {w} needs the image's (H, W), not its HW: pass hw=(H, W)")
    if w > min(H, W):
        raise ValueError(f"occlusion window must be at most the image side {min(H, W)}, got {w}")
    return 1 + (H - w + 1) * (W - w + 1) + curve, 0


def planned_steps(selector: str, hw, pixels_per_step: int = 1, exact_tail: float = 1.0, keep_fraction: float = 1.0) -> int:
    """Sequential steps of one run (images of a batch advance in lock-step): len(step_plan).

    The ranking selectors remove one pixel per step of their curve: HW steps.
    """
    H, W = _check_plan_args(selector, hw, pixels_per_step, exact_tail, 1, keep_fraction)
    hw = H * W
    if selector == RANDOM:
        return 0
    if selector in RANKING_SELECTORS:
        return hw
    n = tail_pixels(hw, exact_tail)
    return _fast_phase(hw, pixels_per_step, n, keep_fraction)[0] + n


def _passes(selector: str, hw, pixels_per_step: int, exact_tail: float, batch: int, params,
            keep_fraction: float = 1.0) -> tuple[int, int]:
    """(forward, backward) passes on `batch` images, arguments checked (see the module docstring)."""
    H, W = _check_plan_args(selector, hw, pixels_per_step, exact_tail, batch, keep_fraction)
    if selector == RANDOM:
        return 0, 0
    if selector in RANKING_SELECTORS:
        forward, backward = _ranking_passes(selector, (H, W), params, not isinstance(hw, (tuple, list)))
        return batch * forward, batch * backward
    n = tail_pixels(H * W, exact_tail)
    steps, candidates, multi = _fast_phase(H * W, pixels_per_step, n, keep_fraction)
    tail = n * (n + 1) // 2
    if selector == "backselect":
        return batch * (candidates + multi + tail), 0
    return batch * (steps + (1 if steps else 0) + tail), batch * steps  # bgsis: gradient steps, the state after them, the tail


def planned_forward_passes(selector: str, hw, pixels_per_step: int = 1, exact_tail: float = 1.0, batch: int = 1, *,
                           params=None, keep_fraction: float = 1.0) -> int:
    """Images the model evaluates to select on `batch` images of hw pixels (closed form).

    Equals `SelectionResult.forward_passes` of a full run (see the module docstring for what counts).
    hw: H·W, or (H, W) (needed by occlusion with a window > 1).
    params: the ranking selectors' parameters (params.check_selector_params; None = defaults);
        backselect and bgsis take k, F and the kept fraction instead.
    Examples: ("backselect", 1024, 1) -> 524,800; ("backselect", 16, 3) -> 66;
    ("bgsis", 299 * 299, 100) -> 895 + 1 = 896; ("ig", 1024) -> 50 + 1,024.
    """
    return _passes(selector, hw, pixels_per_step, exact_tail, batch, params, keep_fraction)[0]


def planned_backward_passes(selector: str, hw, pixels_per_step: int = 1, exact_tail: float = 1.0, batch: int = 1, *,
                            params=None, keep_fraction: float = 1.0) -> int:
    """Backward passes (images back-propagated): one per gradient step for bgsis, none for
    backselect, occlusion and random; 1 for gradient, n_steps for ig, iterations for perturbation
    (those engines report 0: they count a pass with a backward once, as a forward pass)."""
    return _passes(selector, hw, pixels_per_step, exact_tail, batch, params, keep_fraction)[1]


def planned_passes(selector: str, hw, params=None, batch: int = 1) -> tuple[int, int]:
    """(forward, backward) passes of a selector on `batch` images, from its parameters as stored
    (SelectionJob.params): {"k": k, "tail": F, "keep": fraction} for backselect and bgsis (1 each when absent),
    the method's own for the ranking selectors, anything for random (0, 0)."""
    if selector in REMOVAL_SELECTORS:
        k, tail, keep = removal_args(selector, params)
        return _passes(selector, hw, k, tail, batch, None, keep)
    return _passes(selector, hw, 1, 1.0, batch, params)
