"""The closed-form cost of a selector equals what the engines count, for every (HW, k, F, kept
fraction), and for the ranking selectors (gradient, ig, occlusion, perturbation) at several sizes and parameters."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np

from overinterp.selection import (
    REMOVAL_SELECTORS,
    EngineConfig,
    backward_selection,
    batched_gradient_sis,
    planned_backward_passes,
    planned_forward_passes,
    planned_steps,
    n_keep,
    step_plan,
    tail_pixels,
)
from overinterp.selection.cost import planned_passes

TAILS = (1.0, 0.99, 0.5, 0.2, 0.1, 0.05)
KEEPS = (1.0, 0.3)  # 0.3: a fast stop at the kept boundary for most (HW, k, F) below


def linear_logits(x):
    """A cheap two-class model (any callable is a model): the counts do not depend on the weights."""
    s = x.flatten(1).sum(1, keepdim=True)
    return torch.cat([s, -s], 1)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5), (1, 7), (5, 5)])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16, 40])
def test_formula_equals_the_counters(h, w, k):
    hw = h * w
    images = torch.randn(2, 1, h, w, generator=torch.Generator().manual_seed(hw))
    seen = {"forward": 0, "backward": 0}  # images through the model, and those of them it differentiated

    def counted(x):
        seen["forward"] += x.shape[0]
        seen["backward"] += x.shape[0] if x.requires_grad else 0
        return linear_logits(x)

    for tail in TAILS:
        for keep in KEEPS:
            seen.update(forward=0, backward=0)
            bs = backward_selection(counted, images, pixels_per_step=k, exact_tail=tail, keep_fraction=keep, config=EngineConfig(chunk=64))
            assert bs.forward_passes == planned_forward_passes("backselect", hw, k, tail, batch=2, keep_fraction=keep), (hw, k, tail, keep)
            assert seen["forward"] == bs.forward_passes + 2  # the model's real calls: the counted ones and the first prediction of c
            assert bs.backward_passes == 0 == planned_backward_passes("backselect", hw, k, tail, keep_fraction=keep) == seen["backward"]
            assert list(bs.step_sizes) == step_plan(hw, k, tail, keep)
            assert len(bs.step_sizes) == planned_steps("backselect", hw, k, tail, keep)
            seen.update(forward=0, backward=0)
            g = batched_gradient_sis(counted, images, pixels_per_step=k, exact_tail=tail, keep_fraction=keep, engine=EngineConfig(chunk=64))
            assert g.forward_passes == planned_forward_passes("bgsis", hw, k, tail, batch=2, keep_fraction=keep), (hw, k, tail, keep)
            assert seen["forward"] == g.forward_passes + 2
            assert g.backward_passes == planned_backward_passes("bgsis", hw, k, tail, batch=2, keep_fraction=keep) == seen["backward"]
            assert list(g.step_sizes) == step_plan(hw, k, tail, keep) and len(g.step_sizes) == planned_steps("bgsis", hw, k, tail, keep)


def _passes_by_summing(selector, hw, k, tail, keep):
    """The twin of the closed form: walk the plan step by step."""
    plan, n = step_plan(hw, k, tail, keep), tail_pixels(hw, tail)
    remaining, total = hw, 0
    for i, size in enumerate(plan):
        gradient = selector == "bgsis" and i < len(plan) - n
        total += 1 if gradient else remaining + (1 if size > 1 else 0)
        remaining -= size
    gradient_steps = len(plan) - n if selector == "bgsis" else 0
    return total + (1 if gradient_steps else 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 300), st.one_of(st.just(1.0), st.floats(1e-6, 1.0)),
       st.one_of(st.just(1.0), st.floats(1e-6, 1.0)))
def test_closed_form_equals_the_sum_over_the_plan(hw, k, tail, keep):
    plan = step_plan(hw, k, tail, keep)
    n = tail_pixels(hw, tail)
    assert sum(plan) == hw and plan[len(plan) - n :] == [1] * n and all(1 <= s <= k for s in plan)
    ends = set(hw - np.cumsum([0] + plan))  # pixels remaining after each step
    assert n_keep(keep, hw) in ends  # the kept subset is whole steps
    assert len(plan) - len(step_plan(hw, k, tail)) in (0, 1)  # at most one step more
    for selector in REMOVAL_SELECTORS:
        assert planned_forward_passes(selector, hw, k, tail, keep_fraction=keep) == _passes_by_summing(selector, hw, k, tail, keep)
        assert (planned_forward_passes(selector, hw, k, tail, batch=3, keep_fraction=keep)
                == 3 * planned_forward_passes(selector, hw, k, tail, keep_fraction=keep))


def test_known_costs():
    assert planned_forward_passes("backselect", 1024) == 524_800  # the paper's 32x32 exact BS
    assert planned_forward_passes("backselect", 224 * 224) == 224 * 224 * (224 * 224 + 1) // 2
    assert planned_forward_passes("backselect", 16, 3) == (16 + 13 + 10 + 7 + 4 + 1) + 5  # 5 re-scored steps of 3
    assert planned_steps("bgsis", 299 * 299, 100) == 895 and planned_forward_passes("bgsis", 299 * 299, 100) == 896
    assert planned_backward_passes("bgsis", 299 * 299, 100, batch=4) == 4 * 895
    # 32x32, k = 16, last 10% exact: 103-pixel tail (5,356 passes) after 58 k-steps
    assert tail_pixels(1024, 0.1) == 103 and step_plan(1024, 16, 0.1)[:58] == [16] * 57 + [9]
    assert planned_forward_passes("random", 1024, 1) == 0


def test_tail_boundary():
    assert tail_pixels(1000, 0.1) == 100  # 0.1 * 1000 = 100.00000000000001 in floats: not 101
    assert tail_pixels(1024, 0.05) == 52  # the 5% subset: the whole subset is in the exact tail
    assert tail_pixels(64, 1e-9) == 1 and tail_pixels(64, 1.0) == 0 and tail_pixels(64, 0.999) == 64
    assert step_plan(16, 3) == [3, 3, 3, 3, 3, 1]  # F = 1: today's plan
    assert step_plan(16, 5, 0.25) == [5, 5, 2, 1, 1, 1, 1]  # the last k-step shrinks to land on the tail
    assert step_plan(16, 4, 0.999) == [1] * 16  # ceil(0.999 * 16) = 16: everything exact


def test_no_fast_step_crosses_the_kept_boundary():
    assert step_plan(10, 4) == [4, 4, 2] and step_plan(10, 4, keep_fraction=0.3) == [4, 3, 3]  # 3 kept: a step ends at 3 left
    assert step_plan(16, 5, 0.25, keep_fraction=0.1) == [5, 5, 2, 1, 1, 1, 1]  # 2 kept lie in the exact tail: no stop
    assert step_plan(16, 4, keep_fraction=0.25) == [4, 4, 4, 4] and step_plan(16, 1, keep_fraction=0.3) == [1] * 16  # on a step's end; k = 1
    # the ImageNet preset (BGSIS k = 100, 10% kept) at 224 px: 5,018 kept, one step more than without the stop
    # 45,158 removed before it: 451 steps of 100 and one of 58; the 5,018 kept: 50 of 100 and one of 18
    assert step_plan(224 * 224, 100, keep_fraction=0.1) == [100] * 451 + [58] + [100] * 50 + [18]
    assert planned_steps("bgsis", 224 * 224, 100, keep_fraction=0.1) == 503
    assert planned_steps("bgsis", 224 * 224, 100) == 502


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="unknown selector"):
        planned_forward_passes("original", 16)
    with pytest.raises(ValueError, match="hw must be"):
        planned_forward_passes("backselect", 0)
    with pytest.raises(ValueError, match="--exact-tail"):
        planned_steps("bgsis", 16, 4, 0.0)


class CountingModel(torch.nn.Module):
    """A tiny linear classifier that counts the images it back-propagates (a gradient hook on its
    logits): the ranking engines report no backward passes, so the test counts them itself."""

    def __init__(self, c, h, w):
        super().__init__()
        self.fc = torch.nn.Linear(c * h * w, 3)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(c * h * w))
        self.backward_images = 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.backward_images += grad.shape[0]


RANKING_CASES = [
    ("gradient", None),
    ("ig", {"n_steps": 3}),
    ("ig", {"n_steps": 5, "method": "riemann_trapezoid"}),
    ("occlusion", None),
    ("occlusion", {"window": 2}),
    ("occlusion", {"window": 3}),
    ("perturbation", {"iterations": 3}),
]


@pytest.mark.parametrize("h, w", [(3, 4), (4, 4)])
@pytest.mark.parametrize("method, params", RANKING_CASES)
def test_ranking_formulas_equal_the_counters(h, w, method, params):
    from overinterp.selection.attribution import attribution_selection
    from overinterp.selection.perturbation import PerturbationParams, meaningful_perturbation

    images = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(7))
    model = CountingModel(2, h, w)
    if method == "perturbation":
        res = meaningful_perturbation(model, images, params=PerturbationParams(**params), config=EngineConfig(chunk=8))
    else:
        res = attribution_selection(model, images, method, params=params, config=EngineConfig(chunk=8))
    assert res.forward_passes == planned_forward_passes(method, (h, w), batch=2, params=params)
    assert model.backward_images == planned_backward_passes(method, (h, w), batch=2, params=params)
    assert len(res.step_sizes) == planned_steps(method, (h, w))
    assert planned_passes(method, (h, w), params, batch=2) == (res.forward_passes, model.backward_images)


def test_ig_steps_per_pass_do_not_change_the_count():
    from overinterp.selection.attribution import attribution_selection

    images = torch.randn(3, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    model = CountingModel(1, 3, 3)
    res = attribution_selection(model, images, "ig", params={"n_steps": 7}, config=EngineConfig(chunk=8), steps_per_pass=2)
    assert res.forward_passes == planned_forward_passes("ig", 9, batch=3, params={"n_steps": 7}) == 3 * (7 + 9)
    assert model.backward_images == 3 * 7


def test_known_ranking_costs():
    assert planned_passes("gradient", 1024) == (1 + 1024, 1)
    assert planned_passes("ig", 1024) == (50 + 1024, 50)  # Captum's default n_steps
    assert planned_passes("perturbation", (32, 32)) == (300 + 1 + 1024, 300)  # the authors' 300 Adam steps
    assert planned_passes("occlusion", (32, 32), {"window": 4}) == (1 + 29 * 29 + 1024, 0)
    assert planned_passes("occlusion", 1024) == (1 + 1024 + 1024, 0)  # window 1: one position per pixel
    assert planned_passes("backselect", 1024, {"k": 16, "tail": 0.1}) == (planned_forward_passes("backselect", 1024, 16, 0.1), 0)
    assert planned_passes("bgsis", (299, 299), {"k": 100}, batch=2) == (2 * 896, 2 * 895)
    assert planned_passes("random", 1024, {"seed": 0}) == (0, 0)


def test_bad_ranking_arguments():
    with pytest.raises(ValueError, match=r"needs the image's \(H, W\)"):
        planned_forward_passes("occlusion", 16, params={"window": 2})
    with pytest.raises(ValueError, match="at most the image side 3"):
        planned_passes("occlusion", (3, 8), {"window": 4})
    with pytest.raises(ValueError, match="unknown ig parameter"):
        planned_passes("ig", 16, {"steps": 4})
    with pytest.raises(ValueError, match="time a few images"):
        planned_passes("captum:InputXGradient", 16)
    with pytest.raises(ValueError, match="backselect takes k, tail and keep"):
        planned_passes("backselect", 16, {"k": 2, "seed": 1})
