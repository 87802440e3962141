"""The closed-form cost of a selector equals what the engines count, for every (HW, k, F)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from overinterp.selection import (
    EngineConfig,
    backward_selection,
    batched_gradient_sis,
    planned_backward_passes,
    planned_forward_passes,
    planned_steps,
    step_plan,
    tail_pixels,
)

TAILS = (1.0, 0.99, 0.5, 0.2, 0.1, 0.05)


def linear_logits(x):
    """A cheap two-class model (any callable is a model): the counts do not depend on the weights."""
    s = x.flatten(1).sum(1, keepdim=True)
    return torch.cat([s, -s], 1)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5), (1, 7), (5, 5)])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16, 40])
def test_formula_equals_the_counters(h, w, k):
    hw = h * w
    images = torch.randn(2, 1, h, w, generator=torch.Generator().manual_seed(hw))
    for tail in TAILS:
        bs = backward_selection(linear_logits, images, pixels_per_step=k, exact_tail=tail, config=EngineConfig(chunk=64))
        assert bs.forward_passes == planned_forward_passes("backselect", hw, k, tail, batch=2), (hw, k, tail)
        assert bs.backward_passes == 0 == planned_backward_passes("backselect", hw, k, tail)
        assert list(bs.step_sizes) == step_plan(hw, k, tail) and len(bs.step_sizes) == planned_steps("backselect", hw, k, tail)
        g = batched_gradient_sis(linear_logits, images, pixels_per_step=k, exact_tail=tail, engine=EngineConfig(chunk=64))
        assert g.forward_passes == planned_forward_passes("bgsis", hw, k, tail, batch=2), (hw, k, tail)
        assert g.backward_passes == planned_backward_passes("bgsis", hw, k, tail, batch=2)
        assert list(g.step_sizes) == step_plan(hw, k, tail) and len(g.step_sizes) == planned_steps("bgsis", hw, k, tail)


def _passes_by_summing(selector, hw, k, tail):
    """The twin of the closed form: walk the plan step by step."""
    plan, n = step_plan(hw, k, tail), tail_pixels(hw, tail)
    remaining, total = hw, 0
    for i, size in enumerate(plan):
        gradient = selector == "bgsis" and i < len(plan) - n
        total += 1 if gradient else remaining + (1 if size > 1 else 0)
        remaining -= size
    gradient_steps = len(plan) - n if selector == "bgsis" else 0
    return total + (1 if gradient_steps else 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 300), st.one_of(st.just(1.0), st.floats(1e-6, 1.0)))
def test_closed_form_equals_the_sum_over_the_plan(hw, k, tail):
    plan = step_plan(hw, k, tail)
    n = tail_pixels(hw, tail)
    assert sum(plan) == hw and plan[len(plan) - n :] == [1] * n and all(1 <= s <= k for s in plan)
    for selector in ("backselect", "bgsis"):
        assert planned_forward_passes(selector, hw, k, tail) == _passes_by_summing(selector, hw, k, tail)
        assert planned_forward_passes(selector, hw, k, tail, batch=3) == 3 * planned_forward_passes(selector, hw, k, tail)


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


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="unknown selector"):
        planned_forward_passes("original", 16)
    with pytest.raises(ValueError, match="hw must be"):
        planned_forward_passes("backselect", 0)
    with pytest.raises(ValueError, match="--exact-tail"):
        planned_steps("bgsis", 16, 4, 0.0)
