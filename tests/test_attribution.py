"""Attribution selectors (Captum): hand-computable cases, batching never changes an order, names fail early."""

import json
import math

import pytest
import torch

from conftest import TinyConvNet
from overinterp.selection import backward_selection
from overinterp.selection.attribution import attribution_selection
from overinterp.selection.params import ATTRIBUTION_METHODS, check_selector_params, selector_tag_params
from test_selection import LinearScore

sig = lambda v: 1 / (1 + math.exp(-v))


def linear_case():
    # p0 = sigmoid(w.x), contributions w*x = [4, -3, 0.5, -1], score 0.5
    model = LinearScore([1.0, -1.0, 0.5, 1.0])
    x = torch.tensor([[4.0, 3.0], [1.0, -1.0]], dtype=torch.float64)[None, None]
    return model, x


def test_gradient_is_the_absolute_weight_on_a_linear_model():
    # d p0 / d x_j = sigma'(0.5) w_j: |w| = [1, 1, 0.5, 1] -> 2 first, then 0, 1, 3 (ties by index)
    model, x = linear_case()
    res = attribution_selection(model, x, "gradient")
    assert res.order.tolist() == [[2, 0, 1, 3]]
    assert res.forward_passes == 1 + 4
    assert res.curve[0].tolist() == pytest.approx([sig(0), sig(-4), sig(-1), sig(0)], abs=1e-6)


def test_ig_is_the_signed_share_of_the_drop_on_a_linear_model():
    # along x(a) = a·x, p0 = sigmoid(a·0.5): IG_j = contribution_j / 0.5 · (sig(0.5) − sig(0)),
    # so the order is the contributions' (the exact BS order here): 1, 3, 2, 0
    model, x = linear_case()
    res = attribution_selection(model, x, "ig")
    assert res.order.tolist() == [[1, 3, 2, 0]]
    assert res.order.tolist() == backward_selection(model, x).order.tolist()
    assert res.forward_passes == 50 + 4


def test_occlusion_at_window_1_ranks_by_bs_first_step_scores():
    # occlusion score_j = p(x) − p(x without j); least important first = the pixel whose removal
    # keeps p highest, BS's first choice
    model = TinyConvNet(channels=2, seed=4).eval()
    images = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = attribution_selection(model, images, "occlusion")
    bs = backward_selection(model, images, max_steps=1)
    assert torch.equal(res.order[:, 0], bs.order[:, 0])
    assert torch.allclose(res.curve[:, 0], bs.curve[:, 0])
    assert res.forward_passes == 3 * (1 + 16) + 3 * 16


METHODS = [("gradient", None), ("ig", None), ("ig", {"n_steps": 8, "method": "riemann_trapezoid"}),
           ("occlusion", None), ("occlusion", {"window": 2}), ("captum:InputXGradient", None),
           ("captum:FeatureAblation", None), ("captum:DeepLift", None), ("captum:GuidedBackprop", {"importance": "abs"})]


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}-{p}" for m, p in METHODS])
def test_an_image_alone_or_in_a_batch_of_16_gets_the_same_order(method, params):
    model = TinyConvNet(channels=2, seed=1).eval()
    images = torch.randn(16, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batch = attribution_selection(model, images, method, params=params)
    for i in (0, 9, 15):
        alone = attribution_selection(model, images[i : i + 1], method, params=params)
        assert torch.equal(alone.order[0], batch.order[i])
        assert torch.allclose(alone.curve[0], batch.curve[i])
    for row in batch.order:
        assert sorted(row.tolist()) == list(range(16))
    assert batch.step_sizes == (1,) * 16 and batch.order.dtype == torch.int64 and batch.curve.dtype == torch.float32


def test_ig_steps_per_pass_bounds_memory_without_changing_the_order():
    model = TinyConvNet(channels=2, seed=1).eval()
    images = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = attribution_selection(model, images, "ig")
    for steps in (7, 50):
        split = attribution_selection(model, images, "ig", steps_per_pass=steps)
        assert torch.equal(split.order, whole.order)
    alone = attribution_selection(model, images[2:3], "ig", steps_per_pass=7)
    assert torch.equal(alone.order[0], attribution_selection(model, images, "ig", steps_per_pass=7).order[2])


def test_explicit_target():
    model, x = linear_case()
    res = attribution_selection(model, x, "ig", target=torch.tensor([1]))
    assert res.order.tolist() == [[0, 2, 3, 1]]  # for class 1 the most positive contribution goes first
    assert res.confidence.item() == pytest.approx(1 - sig(0.5), abs=1e-6)


def refuse(x):
    raise AssertionError("the model must not run before the name and parameters are checked")


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("bogus", None, r"unknown attribution method 'bogus': choose one of gradient, ig, occlusion or captum:<ClassName>"),
        ("captum:NoSuchThing", None, "unknown Captum attribution 'NoSuchThing'"),
        ("captum:", None, "unknown Captum attribution"),
        ("captum:LayerGradCam", None, "built from forward_func, layer, not from the model alone"),
        ("captum:NoiseTunnel", None, "built from attribution_method"),
        ("ig", {"steps": 10}, "unknown ig parameter.*ig takes n_steps, method"),
        ("ig", {"n_steps": 0}, "n_steps must be an int >= 1"),
        ("ig", {"method": "simpson"}, "ig method must be one of"),
        ("gradient", {"abs": False}, "gradient takes none"),
        ("occlusion", {"window": 9}, "window must be at most the image side 4"),
        ("captum:Saliency", {"bogus": 1}, "does not take 'bogus'"),
        ("captum:Saliency", {"target": 1}, "does not take 'target'"),
        ("captum:Saliency", {"importance": "max"}, "importance must be 'signed' or 'abs'"),
        ("ig", {"n_steps": torch.tensor(3)}, "must be JSON values"),
    ],
)
def test_bad_names_and_parameters_fail_in_one_line_before_any_forward_pass(method, params, message):
    with pytest.raises(ValueError, match=message) as err:
        attribution_selection(refuse, torch.zeros(2, 1, 4, 4), method, params=params)
    assert "\n" not in str(err.value)


def test_resolved_parameters_and_tags():
    assert ATTRIBUTION_METHODS == ("gradient", "ig", "occlusion")
    assert check_selector_params("ig") == {"n_steps": 50, "method": "gausslegendre"}
    assert selector_tag_params("ig") == {"n": 50} and selector_tag_params("ig", {"n_steps": 20}) == {"n": 20}
    assert selector_tag_params("gradient") == {} and selector_tag_params("occlusion", {"window": 3}) == {"window": 3}
    assert selector_tag_params("perturbation") == {"it": 300}
    assert selector_tag_params("perturbation", {"iterations": 100, "seed": 2}) == {"it": 100, "seed": 2}
    assert selector_tag_params("captum:FeatureAblation") == {}
    record = check_selector_params("perturbation", {"lr": 0.05})
    assert record["lr"] == 0.05 and record["seed"] == 0 and json.loads(json.dumps(record)) == record
    with pytest.raises(ValueError, match="unknown perturbation parameter"):
        check_selector_params("perturbation", {"iters": 3})
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        check_selector_params("perturbation", {"seed": -1})


def test_named_captum_classes_run_the_same_way_as_the_built_in_methods():
    model = TinyConvNet(channels=2, seed=5).eval()
    images = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    same = [
        ("gradient", "captum:Saliency", {"importance": "abs"}),
        ("ig", "captum:IntegratedGradients", {"baselines": 0.0}),
        ("occlusion", "captum:Occlusion", {"sliding_window_shapes": [2, 1, 1], "strides": [2, 1, 1]}),  # JSON lists
    ]
    for built_in, named, params in same:
        a, b = attribution_selection(model, images, built_in), attribution_selection(model, images, named, params=params)
        assert torch.equal(a.order, b.order) and a.forward_passes == b.forward_passes
