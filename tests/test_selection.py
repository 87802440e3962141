"""Backward selection against its brute-force twin, and the subset functions on hand-made cases."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyConvNet
from reference import brute_force_backward_selection
from overinterp.selection import (
    NO_SIS,
    REMOVAL_SELECTORS,
    EngineConfig,
    backward_selection,
    batched_gradient_sis,
    keep_mask,
    n_keep,
    planned_forward_passes,
    random_order,
    run_selector,
    params_json,
    selector_params,
    selector_tag,
    sis_mask,
    sis_size,
    tail_mask,
)


class LinearScore(nn.Module):
    """logits = [w . x, 0] on a 1-channel image: p(class 0) = sigmoid(w . x).

    Masking pixel j changes the score by -w_j x_j, so BS removes first the pixel with the most
    negative contribution: the order is computable by hand.
    """

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float64)

    def forward(self, x):
        s = (x.flatten(1).double() * self.w).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_linear_model_order_by_hand():
    # contributions w*x = [4, -3, 0.5, -1], sum 0.5 > 0 so class 0 is predicted;
    # remove the most negative first: 1, 3, then 2 (0.5), then 0 (4)
    model = LinearScore([1.0, -1.0, 0.5, 1.0])
    x = torch.tensor([[4.0, 3.0], [1.0, -1.0]], dtype=torch.float64)[None, None]  # (1, 1, 2, 2)
    res = backward_selection(model, x, config=EngineConfig(channels_last=False))
    assert res.order.tolist() == [[1, 3, 2, 0]]
    assert res.pred.tolist() == [0]
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert res.confidence.item() == pytest.approx(sig(4 - 3 + 0.5 - 1))
    expected = [sig(4 + 0.5 - 1), sig(4 + 0.5), sig(4), sig(0)]
    assert res.curve[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert res.forward_passes == 4 + 3 + 2 + 1


def test_ties_go_to_lowest_pixel_index():
    model = LinearScore([1.0, 1.0, 1.0, 1.0])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)  # every pixel contributes the same
    res = backward_selection(model, x)
    assert res.order.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config",
    [EngineConfig(chunk=1), EngineConfig(chunk=7, channels_last=False), EngineConfig(chunk=16), EngineConfig()],
    ids=["chunk1", "chunk7-nchw", "chunk16", "auto"],
)
def test_engine_matches_brute_force(dtype, config):
    torch.manual_seed(1)
    model = TinyConvNet(channels=2, seed=3, dtype=dtype).eval()
    images = torch.randn(5, 2, 4, 4)
    res = backward_selection(model, images, config=config)
    for i in range(len(images)):
        order, curve = brute_force_backward_selection(model, images[i])
        assert res.order[i].tolist() == order
        assert res.curve[i].tolist() == pytest.approx(curve, abs=1e-5)


def test_batching_never_changes_the_result():
    model = TinyConvNet(channels=1, seed=5).eval()
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = backward_selection(model, images, config=EngineConfig(chunk=5))
    for batch in (1, 2, 4):
        parts = [backward_selection(model, images[s : s + batch], config=EngineConfig(chunk=3)) for s in range(0, 6, batch)]
        assert torch.equal(torch.cat([p.order for p in parts]), whole.order)
        assert torch.allclose(torch.cat([p.curve for p in parts]), whole.curve)


def test_explicit_target_explains_that_class():
    model = LinearScore([1.0, -1.0, 0.5, 1.0])
    x = torch.tensor([[4.0, 3.0], [1.0, -1.0]], dtype=torch.float64)[None, None]
    res = backward_selection(model, x, target=torch.tensor([1]))
    # for class 1 (score -w.x) the most positive contribution goes first: 0 (4), then 2 (0.5)
    assert res.order[0, :2].tolist() == [0, 2]


def test_k_pixels_per_step_is_a_permutation_and_k1_is_exact():
    model = TinyConvNet(channels=1, seed=2).eval()
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    exact = backward_selection(model, images)
    k1 = backward_selection(model, images, pixels_per_step=1)
    assert torch.equal(exact.order, k1.order)
    k3 = backward_selection(model, images, pixels_per_step=3)
    for row in k3.order:
        assert sorted(row.tolist()) == list(range(16))
    # 16 pixels in steps of 3: 16 + 13 + 10 + 7 + 4 + 1 candidates, plus one re-score per step
    assert k3.forward_passes == 3 * (16 + 13 + 10 + 7 + 4 + 1) + 3 * 5
    # the curve of a step is p(c) after the whole step: one value repeated over its k removals
    assert torch.equal(k3.curve[:, 0], k3.curve[:, 2])
    assert k3.step_sizes == (3, 3, 3, 3, 3, 1) and exact.step_sizes == (1,) * 16
    for row in k3.order:  # a step's pixels leave together: listed by ascending pixel id
        for start in range(0, 15, 3):
            step = row[start : start + 3].tolist()
            assert step == sorted(step)


def test_engine_rejects_bad_input():
    model = TinyConvNet(channels=1).eval()
    with pytest.raises(ValueError, match="pixels-per-step"):
        backward_selection(model, torch.zeros(1, 1, 4, 4), pixels_per_step=0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        backward_selection(model, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="CUDA only"):
        backward_selection(model, torch.zeros(1, 1, 4, 4), config=EngineConfig(autocast="bf16"))


# --- SIS and masks --------------------------------------------------------------------------


def test_sis_size_hand_computed():
    # HW = 4; curve[t] = p(c) after t+1 removals; value with only the last k unmasked = curve[HW-k-1]
    curve = torch.tensor([[0.95, 0.5, 0.3, 0.1], [0.99, 0.98, 0.97, 0.2], [0.9, 0.9, 0.9, 0.9]])
    conf = torch.tensor([0.99, 0.995, 0.5])
    # image 0: k=1 -> curve[2]=0.3, k=2 -> 0.5, k=3 -> 0.95, k=4 -> 0.99 >= 0.99: size 4
    # image 1: k=1 -> 0.97 < 0.97? no (tau 0.975); k=2 -> 0.98: size 2
    # image 2: confidence 0.5 < tau: no SIS
    assert sis_size(curve, conf, 0.975).tolist() == [4, 2, NO_SIS]
    assert sis_size(curve, conf, 0.0).tolist() == [1, 1, 1]  # tau = 0: every image gets a row and size 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=12), st.floats(0, 1), st.floats(0, 1))
def test_sis_size_is_the_first_sufficient_tail(curve, conf, tau):
    hw = len(curve)
    got = int(sis_size(torch.tensor([curve], dtype=torch.float64), torch.tensor([conf], dtype=torch.float64), tau)[0])
    if conf < tau:
        assert got == NO_SIS
        return
    expected = next(k for k in range(1, hw + 1) if (curve[hw - k - 1] if k < hw else conf) >= tau)
    assert got == expected


def test_keep_mask_and_tail_mask():
    order = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3]])
    assert keep_mask(order, 0.5).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert keep_mask(order, 1.0).all()
    assert keep_mask(order, 0.01).sum(1).tolist() == [1, 1]  # ceil: never empty
    assert tail_mask(order, torch.tensor([1, 0])).tolist() == [[False, True, False, False], [False] * 4]
    assert n_keep(0.05, 1024) == 52 and n_keep(0.05, 64) == 4 and n_keep(0.1, 299 * 299) == 8941


def test_sis_mask_is_empty_without_sis():
    order = torch.tensor([[0, 1, 2, 3]])
    curve = torch.tensor([[0.9, 0.9, 0.9, 0.9]])
    assert not sis_mask(order, curve, torch.tensor([0.5]), 0.9).any()
    assert sis_mask(order, curve, torch.tensor([0.95]), 0.9).tolist() == [[False, False, False, True]]


def test_random_order_fixed_per_image_and_split():
    ids = np.array([0, 5, 7])
    a = random_order(ids, 16, seed=0, split="train")
    b = random_order(np.array([7]), 16, seed=0, split="train")
    assert torch.equal(a[2], b[0])  # independent of which batch the image is in
    assert not torch.equal(a, random_order(ids, 16, seed=0, split="test"))
    assert not torch.equal(a, random_order(ids, 16, seed=1, split="train"))
    for row in a:
        assert sorted(row.tolist()) == list(range(16))


def test_selector_tags():
    assert selector_tag("backselect", {"k": 1}) == "backselect"
    assert selector_tag("backselect", {"k": 4}) == "backselect-k4"
    assert selector_tag("random", {"seed": 0}) == "random-seed0"
    with pytest.raises(ValueError, match="unknown selector"):
        selector_tag("bogus", {})


# --- engine settings ------------------------------------------------------------------------


def test_compiled_engine_matches_brute_force():
    model = TinyConvNet(channels=1, seed=8, dtype=torch.float32).eval()
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    res = backward_selection(model, images, config=EngineConfig(compile=True, chunk=8))
    for i in range(3):
        order, curve = brute_force_backward_selection(model, images[i])
        assert res.order[i].tolist() == order
        assert res.curve[i].tolist() == pytest.approx(curve, abs=1e-5)


def _count_measures(monkeypatch) -> list:
    """Patch the chunk measurement to record each call (and still measure)."""
    from overinterp.selection import engine

    calls, measure = [], engine._measure_best_chunk
    monkeypatch.setattr(engine, "_measure_best_chunk", lambda *a, **k: calls.append(a[2]) or measure(*a, **k))
    return calls


def test_chunk_tuning_is_bounded_and_cached(monkeypatch):
    from overinterp.selection.engine import max_chunk, tune_chunk

    measured = _count_measures(monkeypatch)
    model = TinyConvNet(channels=1, dtype=torch.float32).eval()
    sample = torch.randn(2, 1, 4, 4)
    limit = max_chunk(model, sample, memory_bytes=64 * 1024)
    assert 1 <= limit <= 64 * 1024 // (16 * 4)  # at least the input itself must fit per candidate
    chunk = tune_chunk(model, sample, limit, channels_last=True)
    assert 1 <= chunk <= limit
    assert tune_chunk(model, sample, limit, channels_last=True) == chunk
    assert measured == [limit]  # measured once, then reused


def test_chunk_tuning_on_a_gpu_looks_past_a_plateau(monkeypatch):
    # a GPU's rate curve (images/s by batch) can be flat for two doublings and then jump, as an
    # H100's did for ResNet20 at 32 px; the CPU's early stop would settle on the plateau's start
    from overinterp.selection import engine

    curve = {8: 10e3, 16: 20e3, 32: 40e3, 64: 60e3, 128: 61e3, 256: 61e3, 512: 62e3, 1024: 66e3, 2048: 120e3, 4096: 145e3, 8192: 143e3}
    monkeypatch.setattr(engine, "forward_rate", lambda forward, sample, size, channels_last: curve[size])
    sample = torch.randn(2, 1, 4, 4)
    assert engine._measure_best_chunk(None, sample, 8192, True, stop_early=True) == 64
    assert engine._measure_best_chunk(None, sample, 8192, True, stop_early=False) == 4096  # 8,192 is not 3% faster


def test_a_limit_that_moves_within_one_power_of_two_reuses_the_tuned_chunk_and_no_chunk_exceeds_a_step(monkeypatch):
    # on CUDA the limit follows the free memory, which moves between calls; the sizes tried do not
    from overinterp.selection.engine import Scorer, tune_chunk

    measured = _count_measures(monkeypatch)
    model = TinyConvNet(channels=1, dtype=torch.float32).eval()
    sample = torch.randn(2, 1, 4, 4)
    tune_chunk(model, sample, 1000, channels_last=True)
    tune_chunk(model, sample, 1023, channels_last=True)
    assert measured == [1000]
    tune_chunk(model, sample, 1024, channels_last=True)  # 1,024 itself is a new size to try
    assert measured == [1000, 1024]
    # the first step scores B·HW = 2 x 16 candidates: no larger chunk is tried
    assert Scorer(TinyConvNet(channels=1, dtype=torch.float32).eval(), EngineConfig(), sample).chunk <= 32


def test_max_steps_stops_early():
    model = TinyConvNet(channels=1).eval()
    res = backward_selection(model, torch.randn(2, 1, 4, 4, dtype=torch.float64), max_steps=3)
    full = backward_selection(model, torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=None), max_steps=None)
    assert (res.order[:, 3:] == -1).all() and (res.order[:, :3] >= 0).all()
    assert res.forward_passes == 2 * (16 + 15 + 14) and full.forward_passes == 2 * 136


def test_integer_images_are_rejected_before_any_forward_pass():
    def forward(x):
        raise AssertionError("the model must not run on invalid input")

    with pytest.raises(ValueError, match="normalised floats"):
        backward_selection(forward, torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


# --- exact tail -----------------------------------------------------------------------------


def _tail_images(n=4, channels=2, seed=6):
    return torch.randn(n, channels, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3, 16])
def test_exact_tail_one_is_the_selector_without_it(k):
    model = TinyConvNet(channels=2, seed=3).eval()
    images = _tail_images()
    plain = backward_selection(model, images, pixels_per_step=k, config=EngineConfig(chunk=7))
    f1 = backward_selection(model, images, pixels_per_step=k, exact_tail=1.0, config=EngineConfig(chunk=7))
    assert torch.equal(plain.order, f1.order) and torch.equal(plain.curve, f1.curve)
    assert plain.step_sizes == f1.step_sizes and plain.forward_passes == f1.forward_passes
    if k == 1:  # today's exact BS: the brute-force twin, order for order
        for i in range(len(images)):
            order, curve = brute_force_backward_selection(model, images[i])
            assert f1.order[i].tolist() == order and f1.curve[i].tolist() == pytest.approx(curve, abs=1e-6)  # curve is float32


@pytest.mark.parametrize("tail", [0.05, 0.3, 0.99])
def test_k1_is_exact_whatever_the_tail(tail):
    model = TinyConvNet(channels=2, seed=3).eval()
    images = _tail_images()
    exact = backward_selection(model, images, config=EngineConfig(chunk=5))
    res = backward_selection(model, images, exact_tail=tail, config=EngineConfig(chunk=5))
    assert torch.equal(exact.order, res.order) and torch.equal(exact.curve, res.curve)
    assert selector_tag("backselect", selector_params("backselect", 1, tail)) == "backselect"


@pytest.mark.parametrize("k, tail, n_tail", [(3, 0.25, 4), (5, 0.25, 4), (4, 0.5, 8), (16, 0.1, 2), (2, 0.01, 1)])
def test_last_removals_are_exact_bs_from_where_the_k_steps_left_off(k, tail, n_tail):
    """The tail is brute-force BS restricted to the pixels the k-steps left (class c from the
    unmasked image); the k-steps before it follow the k-step rule (compared with F = 1)."""
    model = TinyConvNet(channels=2, seed=3).eval()
    images = _tail_images()
    res = backward_selection(model, images, pixels_per_step=k, exact_tail=tail, config=EngineConfig(chunk=7))
    bulk = 16 - n_tail
    assert res.step_sizes[len(res.step_sizes) - n_tail :] == (1,) * n_tail and sum(res.step_sizes[: len(res.step_sizes) - n_tail]) == bulk
    for i in range(len(images)):
        done = res.order[i, :bulk].tolist()
        order, curve = brute_force_backward_selection(model, images[i], masked=done)
        assert res.order[i, bulk:].tolist() == order
        assert res.curve[i, bulk:].tolist() == pytest.approx(curve, abs=1e-6)
    # the k-steps are the k-step rule: identical to k per step all the way, up to the last k-step,
    # which is shrunk so it lands exactly on the tail (its pixels are the top-scoring of that step)
    full_k = backward_selection(model, images, pixels_per_step=k, config=EngineConfig(chunk=7))
    whole = bulk - bulk % k
    assert torch.equal(res.order[:, :whole], full_k.order[:, :whole]) and torch.equal(res.curve[:, :whole], full_k.curve[:, :whole])


def test_exact_tail_step_sizes_and_canonical_order():
    model = TinyConvNet(channels=1, seed=2).eval()
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    res = backward_selection(model, images, pixels_per_step=5, exact_tail=0.25)  # 16 px: 5, 5, 2 then 4 x 1
    assert res.step_sizes == (5, 5, 2, 1, 1, 1, 1)
    assert res.forward_passes == 3 * (16 + 11 + 6 + 3 + (4 + 3 + 2 + 1)) == planned_forward_passes("backselect", 16, 5, 0.25, batch=3)
    start = 0
    for size in res.step_sizes:  # within a step: ascending pixel id, one p(c)
        step = res.order[:, start : start + size]
        assert torch.equal(step, step.sort(1).values)
        assert (res.curve[:, start : start + size] == res.curve[:, start : start + 1]).all()
        start += size
    for row in res.order:
        assert sorted(row.tolist()) == list(range(16))


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5), (6, 6)])
def test_exact_bs_evaluates_hw_hw_plus_1_over_2_images(h, w):
    model = TinyConvNet(channels=1, seed=1).eval()
    res = backward_selection(model, torch.randn(2, 1, h, w, dtype=torch.float64), config=EngineConfig(chunk=64))
    hw = h * w
    assert res.forward_passes == 2 * hw * (hw + 1) // 2 == planned_forward_passes("backselect", hw, batch=2)


def _never_called(x):
    raise AssertionError("bad arguments must fail before the model runs")


@pytest.mark.parametrize("k, tail, match", [
    (0, 1.0, "--pixels-per-step must be an integer >= 1, got 0"),
    (2.5, 1.0, "--pixels-per-step must be an integer >= 1, got 2.5"),
    (True, 1.0, "--pixels-per-step"),
    (4, 0, r"--exact-tail must be in \(0, 1\], got 0 \(0.1 keeps the last 10% exact"),
    (4, 1.5, r"--exact-tail must be in \(0, 1\], got 1.5"),
    (4, -0.1, "--exact-tail"),
    (4, float("nan"), "--exact-tail"),
    (4, "0.1", "--exact-tail"),
])
def test_bad_k_or_tail_is_one_line_before_any_work(k, tail, match):
    images = torch.zeros(2, 1, 4, 4)
    calls = [
        lambda: backward_selection(_never_called, images, pixels_per_step=k, exact_tail=tail),
        lambda: batched_gradient_sis(_never_called, images, pixels_per_step=k, exact_tail=tail),
        lambda: run_selector("backselect", _never_called, images, {"k": k, "tail": tail}),
        lambda: run_selector("bgsis", _never_called, images, {"k": k, "tail": tail}),
        lambda: selector_params("backselect", k, tail),
        lambda: planned_forward_passes("bgsis", 16, k, tail),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_exact_tail_tags_never_mix():
    tag = lambda name, k, f: selector_tag(name, selector_params(name, k, f))
    assert tag("backselect", 16, 0.1) == "backselect-k16-tail0.1"
    assert tag("bgsis", 100, 0.05) == "bgsis-k100-tail0.05"
    # tail 1 (off) keeps the tags the store already holds
    assert tag("backselect", 1, 1.0) == "backselect" and tag("backselect", 4, 1.0) == "backselect-k4"
    assert tag("bgsis", 100, 1.0) == "bgsis-k100" == selector_tag("bgsis", {"k": 100})
    assert selector_tag("backselect", {"k": 4, "tail": 1}) == "backselect-k4"
    assert len({tag("backselect", k, f) for k in (4, 16) for f in (0.05, 0.1, 1.0)}) == 6
    # the kept fraction decides where a k-step ends: in the tag for k > 1, so selections made with
    # another fraction (or none) never mix; exact BS is the same at any fraction
    keep = lambda name, k, fraction: selector_tag(name, selector_params(name, k, 1.0, None, fraction))
    assert keep("bgsis", 100, 0.1) == "bgsis-k100-keep0.1" and keep("backselect", 4, 0.05) == "backselect-k4-keep0.05"
    assert keep("backselect", 1, 0.05) == "backselect" == keep("backselect", 1, 1.0) and keep("bgsis", 100, 1.0) == "bgsis-k100"


# --- the registry: every selector through one dispatch -------------------------------------------

@pytest.mark.parametrize("name, options, tag", [
    ("gradient", None, "gradient"),
    ("ig", {"n_steps": 8}, "ig-n8"),
    ("occlusion", {"window": 2}, "occlusion-window2"),
    ("perturbation", {"iterations": 5}, "perturbation-it5"),
    ("captum:InputXGradient", None, "captum_InputXGradient"),
])
def test_ranking_selectors_dispatch_store_and_tag(tiny_net, name, options, tag):
    from overinterp.selection import attribution_selection, meaningful_perturbation, PerturbationParams

    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = selector_params(name, options=options)
    assert selector_tag(name, params) == tag
    res = run_selector(name, tiny_net, x, json.loads(params_json(params)))  # what a worker gets back from the row
    if name == "perturbation":
        seed = params.pop("seed")
        direct = meaningful_perturbation(tiny_net, x, params=PerturbationParams(**params), seed=seed)
    else:
        direct = attribution_selection(tiny_net, x, name, params=params)
    assert torch.equal(res.order, direct.order) and torch.equal(res.curve, direct.curve)
    assert res.order.shape == (3, 16) and list(res.step_sizes) == [1] * 16


@pytest.mark.parametrize("name, options, match", [
    ("saliency", None, "unknown selector 'saliency': choose from backselect, bgsis, perturbation"),
    ("captum:NoSuchMethod", None, "NoSuchMethod"),
    ("ig", {"n_step": 3}, "unknown ig parameter"),
    ("backselect", {"window": 3}, "backselect takes --pixels-per-step and --exact-tail"),
])
def test_bad_selector_names_and_options_are_one_line(name, options, match):
    with pytest.raises(ValueError, match=match) as err:
        selector_params(name, options=options)
    assert "\n" not in str(err.value)


def test_selector_names_and_parameters_import_without_torch():
    """Configuration and planning check selectors and count passes without loading torch."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, overinterp.selection.params, overinterp.selection.cost, overinterp.selection as s; "
            "s.selector_params('ig'); s.planned_passes('backselect', 16, {'k': 2}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_listed_selector_runs_through_one_dispatch_and_has_a_pass_formula(tiny_net):
    """The one list (params.SELECTORS) is what run_selector dispatches and cost.py plans: each
    model selector runs with its default parameters and makes exactly the passes planned for it;
    random is planned (no passes) but explains no model; captum:<ClassName> runs without a formula."""
    from overinterp.selection import (
        CAPTUM_PREFIX,
        MODEL_SELECTORS,
        RANDOM,
        RANKING_SELECTORS,
        SELECTORS,
        is_model_selector,
        planned_passes,
    )

    assert SELECTORS == REMOVAL_SELECTORS + RANKING_SELECTORS + (RANDOM,) and len(set(SELECTORS)) == len(SELECTORS)
    assert MODEL_SELECTORS == REMOVAL_SELECTORS + RANKING_SELECTORS
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name in MODEL_SELECTORS:
        options = {"iterations": 2} if name == "perturbation" else None  # keeps the test fast
        params = selector_params(name, 2, 0.5) if name in REMOVAL_SELECTORS else selector_params(name, options=options)
        res = run_selector(name, tiny_net, x, params, EngineConfig(chunk=4))
        assert res.order.shape == (2, 9) and sorted(res.order[0].tolist()) == list(range(9)), name
        forward, backward = planned_passes(name, (3, 3), params, batch=2)
        assert res.forward_passes == forward, name
        if name in REMOVAL_SELECTORS:  # the ranking engines count a pass with a backward as a forward pass only
            assert res.backward_passes == backward, name
    assert planned_passes(RANDOM, (3, 3), {"seed": 0}) == (0, 0) and not is_model_selector(RANDOM)
    with pytest.raises(ValueError, match="unknown selector 'random'"):
        run_selector(RANDOM, tiny_net, x, {"seed": 0})
    captum = CAPTUM_PREFIX + "InputXGradient"
    assert is_model_selector(captum) and captum not in SELECTORS
    assert run_selector(captum, tiny_net, x, selector_params(captum)).order.shape == (2, 9)
    with pytest.raises(ValueError, match="no cost formula"):
        planned_passes(captum, (3, 3))
    for entry in (lambda: selector_params("saliency"), lambda: planned_passes("saliency", (3, 3)),
                  lambda: run_selector("saliency", tiny_net, x, {})):
        with pytest.raises(ValueError, match="unknown selector 'saliency'"):
            entry()


def test_dilate_keep_grows_each_pixel_to_its_3x3_neighbourhood():
    from overinterp.selection.subsets import dilate_keep

    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, 0] = True  # corner (0, 0) of a 4x4 image
    keep[1, 5] = True  # inner pixel (1, 1)
    out = dilate_keep(keep, 4, 4)
    assert sorted(out[0].nonzero().flatten().tolist()) == [0, 1, 4, 5]
    assert sorted(out[1].nonzero().flatten().tolist()) == [0, 1, 2, 4, 5, 6, 8, 9, 10]


# --- progress from inside a batch: on_passes ----------------------------------------------------

@pytest.mark.parametrize("name, options", [
    ("backselect", {"k": 1}),
    ("backselect", {"k": 3}),
    ("backselect", {"k": 4, "tail": 0.25}),
    ("bgsis", {"k": 3}),
    ("bgsis", {"k": 4, "tail": 0.25}),
    ("gradient", None),
    ("ig", {"n_steps": 4}),
    ("occlusion", {"window": 2}),
    ("perturbation", {"iterations": 3}),
])
def test_on_passes_reports_every_pass_as_it_is_made(tiny_net, name, options):
    """The callback's calls sum to the engine's own pass counter, in more than one call (so a long
    batch reports before it returns), each a Python int (no tensor: no host sync)."""
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if name in REMOVAL_SELECTORS:
        params = selector_params(name, options["k"], options.get("tail", 1.0))
    else:
        params = selector_params(name, options=options)
    calls = []
    res = run_selector(name, tiny_net, x, params, EngineConfig(chunk=5), on_passes=calls.append)
    assert sum(calls) == res.forward_passes > 0
    assert len(calls) > 1 and all(type(n) is int and n > 0 for n in calls)
    plain = run_selector(name, tiny_net, x, params, EngineConfig(chunk=5))
    assert torch.equal(plain.order, res.order) and plain.forward_passes == res.forward_passes


def test_exact_fp32_turns_cudas_tf32_off_inside_and_restores_it():
    """The exact engine on a GPU scores without TF32 (cuDNN's default for convolutions), and leaves
    the process's flags as it found them."""
    from overinterp.selection.engine import exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
