"""The ranking curve against a brute-force twin; orders from scores; results any report can use."""

import math

import pytest
import torch

from conftest import TinyConvNet
from overinterp.selection import EngineConfig, backward_selection, sis_size
from overinterp.selection.engine import ranks
from overinterp.selection.ranking import order_from_importance, ranking_curve, result_from_scores
from test_selection import LinearScore


def brute_force_curve(model, image, order, c):
    """One image (C, H, W), one prefix per forward pass, plain Python."""
    C, H, W = image.shape
    x = image.clone()
    out = []
    with torch.no_grad():
        for p in order:
            x[:, p // W, p % W] = 0.0
            out.append(float(torch.softmax(model(x[None]).double(), 1)[0, c]))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, None], ids=["chunk1", "chunk7", "chunk64", "auto"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_curve_matches_brute_force(chunk, channels_last):
    model = TinyConvNet(channels=2, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g)
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    target = torch.tensor([0, 2, 1])
    curve = ranking_curve(model, images, order, target, chunk=chunk, config=EngineConfig(channels_last=channels_last))
    assert curve.dtype == torch.float32 and curve.shape == (3, 16)
    for i in range(3):
        expected = brute_force_curve(model, images[i], order[i].tolist(), int(target[i]))
        assert curve[i].tolist() == pytest.approx(expected, abs=1e-6)


def test_curve_of_the_backselect_order_is_the_backselect_curve():
    model = TinyConvNet(channels=1, seed=2).eval()
    images = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bs = backward_selection(model, images)
    curve = ranking_curve(model, images, bs.order, bs.pred)
    assert torch.allclose(curve, bs.curve, atol=1e-6)


def test_ties_go_to_the_lowest_index_and_order_is_a_permutation():
    importance = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.0, 0.5], [1.0] * 6])
    assert order_from_importance(importance).tolist() == [[4, 1, 3, 0, 2, 5], [0, 1, 2, 3, 4, 5]]
    scores = torch.randint(0, 3, (5, 30), generator=torch.Generator().manual_seed(0)).double()
    order = order_from_importance(scores)
    for row, s in zip(order, scores):
        assert sorted(row.tolist()) == list(range(30))
        assert row.tolist() == sorted(range(30), key=lambda j: (float(s[j]), j))
    assert torch.equal(ranks(order).gather(1, order), torch.arange(30).expand(5, 30))


def test_result_from_scores_on_a_linear_model_by_hand():
    # contributions w*x = [4, -3, 0.5, -1]; scoring each pixel by its contribution removes the
    # most negative first — the exact BS order for this model: 1, 3, 2, 0
    model = LinearScore([1.0, -1.0, 0.5, 1.0])
    x = torch.tensor([[4.0, 3.0], [1.0, -1.0]], dtype=torch.float64)[None, None]
    res = result_from_scores(model, x, torch.tensor([[4.0, -3.0, 0.5, -1.0]]), forward_passes=10)
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert res.order.tolist() == [[1, 3, 2, 0]]
    assert res.pred.tolist() == [0] and res.confidence.item() == pytest.approx(sig(0.5), abs=1e-6)
    assert res.curve[0].tolist() == pytest.approx([sig(3.5), sig(4.5), sig(4), sig(0)], abs=1e-6)
    assert res.forward_passes == 10 + 4 and res.step_sizes == (1, 1, 1, 1)
    assert res.order.dtype == torch.int64 and res.curve.dtype == torch.float32
    # SIS works as for BS: at tau 0.6 (confidence 0.62) the last pixel alone (p = sig(4)) suffices
    assert sis_size(res.curve, res.confidence, 0.6).tolist() == [1]
    # an explicit target explains that class
    res1 = result_from_scores(model, x, torch.zeros(1, 4), target=torch.tensor([1]))
    assert res1.curve[0, -1].item() == pytest.approx(0.5) and res1.confidence.item() == pytest.approx(1 - sig(0.5), abs=1e-6)


def test_bad_shapes_fail_before_any_forward_pass():
    def forward(x):
        raise AssertionError("the model must not run on invalid input")

    with pytest.raises(ValueError, match="importance must be"):
        result_from_scores(forward, torch.zeros(1, 1, 2, 2), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="order must be"):
        ranking_curve(forward, torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))
    with pytest.raises(ValueError, match="normalised floats"):
        result_from_scores(forward, torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, 4))
