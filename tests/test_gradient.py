"""Batched Gradient SIS against a one-image-at-a-time twin; batching never changes the result."""

import pytest
import torch

from conftest import TinyConvNet
from reference import brute_force_backward_selection
from overinterp.selection import (
    EngineConfig,
    batched_gradient_sis,
    planned_backward_passes,
    planned_forward_passes,
    run_selector,
    selector_params,
    selector_tag,
)
from test_selection import LinearScore


def twin(model, image, k):
    """One image, plain loop: mask the k unmasked pixels with the largest d p(c) / d mask."""
    C, H, W = image.shape
    c = int(model(image[None]).argmax(1))
    masked = [False] * (H * W)
    order = []
    while len(order) < H * W:
        m = torch.tensor(masked, dtype=image.dtype).view(1, 1, H, W).requires_grad_(True)
        p = torch.softmax(model((1 - m) * image[None]), 1)[0, c]
        (g,) = torch.autograd.grad(p, m)
        g = g.flatten().tolist()
        free = sorted((i for i in range(H * W) if not masked[i]), key=lambda i: (-g[i], i))
        for i in sorted(free[:k]):  # a step's pixels leave together: listed by pixel id
            masked[i] = True
            order.append(i)
    return order


@pytest.mark.parametrize("k", [1, 3, 16])
def test_matches_twin(k):
    model = TinyConvNet(channels=2, seed=4).eval()
    images = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = batched_gradient_sis(model, images, pixels_per_step=k)
    for i in range(4):
        assert res.order[i].tolist() == twin(model, images[i], k)


def test_batch_size_never_changes_the_result():
    model = TinyConvNet(channels=1, seed=6).eval()
    images = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = batched_gradient_sis(model, images, pixels_per_step=2)
    for b in (1, 2, 3):
        parts = [batched_gradient_sis(model, images[s : s + b], pixels_per_step=2) for s in range(0, 6, b)]
        assert torch.equal(torch.cat([p.order for p in parts]), whole.order)
        assert torch.allclose(torch.cat([p.curve for p in parts]), whole.curve)


def test_linear_model_by_hand():
    # p0 = sigmoid(sum_j (1 - m_j) w_j x_j): d p0 / d m_j = -sigma' w_j x_j, largest for the most
    # negative contribution — contributions [4, -3, 0.5, -1] give 1, 3, 2, 0 as for exact BS
    model = LinearScore([1.0, -1.0, 0.5, 1.0])
    x = torch.tensor([[4.0, 3.0], [1.0, -1.0]], dtype=torch.float64)[None, None]
    res = batched_gradient_sis(model, x, pixels_per_step=1)
    assert res.order.tolist() == [[1, 3, 2, 0]]
    sig = lambda v: float(torch.sigmoid(torch.tensor(v)))
    assert res.curve[0].tolist() == pytest.approx([sig(4.5 - 1), sig(4.5), sig(4), sig(0)], abs=1e-6)
    assert res.forward_passes == 1 * (4 + 1) and res.backward_passes == 4  # 4 gradient steps + the all-masked image


def test_curve_is_constant_within_a_step_and_ends_all_masked():
    model = TinyConvNet(channels=1, seed=1).eval()
    images = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    res = batched_gradient_sis(model, images, pixels_per_step=5)  # steps of 5, 5, 5, 1
    assert torch.equal(res.curve[:, 0], res.curve[:, 4]) and torch.equal(res.curve[:, 10], res.curve[:, 14])
    all_masked = torch.softmax(model(torch.zeros_like(images)), 1).gather(1, res.pred[:, None]).squeeze(1)
    assert torch.allclose(res.curve[:, -1], all_masked.float())
    for row in res.order:
        assert sorted(row.tolist()) == list(range(16))
    assert res.step_sizes == (5, 5, 5, 1)


def test_dispatch_and_tags():
    model = TinyConvNet(channels=1).eval()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(run_selector("bgsis", model, x, {"k": 4}).order, batched_gradient_sis(model, x, pixels_per_step=4).order)
    assert selector_tag("bgsis", {"k": 100}) == "bgsis-k100"
    with pytest.raises(ValueError, match="unknown selector .random."):
        run_selector("random", model, x, {"k": 1})


@pytest.mark.parametrize("name", ["bgsis", "backselect"])
def test_the_kept_subset_is_whole_steps_the_selector_chose(name):
    # 4x4, k = 5, 25% kept (4 pixels): without a stop at the boundary the steps are (5, 5, 5, 1) and
    # the subset would take the 3 highest pixel ids of the third step; with it, (5, 5, 2, 4)
    from overinterp.store import steps_to_keep
    from overinterp.store.format import encode_steps

    model = TinyConvNet(channels=1).eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = selector_params(name, 5, options=None, keep_fraction=0.25)
    assert params == {"k": 5, "keep": 0.25} and selector_tag(name, params) == f"{name}-k5-keep0.25"
    res = run_selector(name, model, x, params)
    assert res.step_sizes == (5, 5, 2, 4)
    steps = encode_steps(res.order.numpy(), res.step_sizes)
    kept = steps_to_keep(steps, 0.25)
    assert (kept == (steps == 3)).all() and kept.sum(1).tolist() == [4, 4, 4]  # exactly the last step's pixels


# --- exact tail -----------------------------------------------------------------------------


@pytest.mark.parametrize("k, tail, n_tail", [(3, 0.25, 4), (5, 0.5, 8), (1, 0.1, 2), (16, 0.3, 5)])
def test_exact_tail_is_brute_force_bs_on_the_pixels_left(k, tail, n_tail):
    model = TinyConvNet(channels=2, seed=4).eval()
    images = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = batched_gradient_sis(model, images, pixels_per_step=k, exact_tail=tail, engine=EngineConfig(chunk=5))
    bulk = 16 - n_tail
    q, r = divmod(bulk, k)
    assert res.step_sizes == (k,) * q + ((r,) if r else ()) + (1,) * n_tail
    gradient_only = batched_gradient_sis(model, images, pixels_per_step=k)
    for i in range(3):
        # the gradient steps are the gradient rule (the twin), up to the shrunk last one
        assert res.order[i, : q * k].tolist() == twin(model, images[i], k)[: q * k]
        order, curve = brute_force_backward_selection(model, images[i], masked=res.order[i, :bulk].tolist())
        assert res.order[i, bulk:].tolist() == order
        assert res.curve[i, bulk:].tolist() == pytest.approx(curve, abs=1e-6)
    assert torch.equal(res.order[:, : q * k], gradient_only.order[:, : q * k])
    # the curve runs on across the switch: the last gradient step holds p(c) of the state it left
    left = images * (~torch.zeros(3, 16, dtype=torch.bool).scatter_(1, res.order[:, :bulk], True)).view(3, 1, 4, 4)
    p_left = torch.softmax(model(left), 1).gather(1, res.pred[:, None]).squeeze(1)
    assert torch.allclose(res.curve[:, bulk - 1], p_left.float())
    assert not res.curve.isnan().any()
    assert res.forward_passes == planned_forward_passes("bgsis", 16, k, tail, batch=3)
    assert res.backward_passes == planned_backward_passes("bgsis", 16, k, tail, batch=3) == 3 * (q + (1 if r else 0))


def test_exact_tail_one_is_gradient_sis_bit_for_bit():
    model = TinyConvNet(channels=1, seed=6).eval()
    images = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = batched_gradient_sis(model, images, pixels_per_step=3)
    f1 = batched_gradient_sis(model, images, pixels_per_step=3, exact_tail=1.0)
    assert torch.equal(plain.order, f1.order) and torch.equal(plain.curve, f1.curve) and plain.step_sizes == f1.step_sizes


def test_exact_tail_batching_never_changes_the_result():
    model = TinyConvNet(channels=1, seed=6).eval()
    images = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = batched_gradient_sis(model, images, pixels_per_step=3, exact_tail=0.4, engine=EngineConfig(chunk=11))
    parts = [batched_gradient_sis(model, images[s : s + 2], pixels_per_step=3, exact_tail=0.4, engine=EngineConfig(chunk=4)) for s in (0, 2, 4)]
    assert torch.equal(torch.cat([p.order for p in parts]), whole.order)
    assert torch.allclose(torch.cat([p.curve for p in parts]), whole.curve)


def test_dispatch_passes_the_tail():
    model = TinyConvNet(channels=1).eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a = run_selector("bgsis", model, x, {"k": 4, "tail": 0.5})
    b = batched_gradient_sis(model, x, pixels_per_step=4, exact_tail=0.5)
    assert torch.equal(a.order, b.order) and a.step_sizes == (4, 4) + (1,) * 8
