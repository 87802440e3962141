"""overinterp/explain/study.py: the questions of `overinterp run --explain` on the exact denoiser of
Gaussian data and hand-built classifiers whose answers are known: VCE targets, the stacked
objective, packing several questions into shared batches without changing an image, the
two-way disagreement's signs, and the answers' measures."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # the `explain` extra

from overinterp.explain.guided import GuidanceConfig, generate  # noqa: E402
from overinterp.explain.objectives import ClassVisualisation, Disagreement  # noqa: E402
from overinterp.explain.study import (  # noqa: E402
    Request, Stacked, counterfactuals, disagreement, generate_requests, vce_targets,
)
from test_explain_guided import MEAN, STD, Brightness, FixedLogits, dark_images, gaussian_prior  # noqa: E402

torch.set_num_threads(1)


class Dim(torch.nn.Module):
    """Brightness with the classes swapped: it calls bright images class 0."""

    def __init__(self):
        super().__init__()
        self.bright = Brightness()

    def forward(self, x):
        return self.bright(x).flip(1)


def test_vce_targets_are_every_other_class_or_the_most_probable_others():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert vce_targets(probs, 9).tolist() == [[0, 2], [1, 2]]  # the predicted class left out, class order kept
    assert vce_targets(probs, 1).tolist() == [[2], [2]]  # fewer targets than classes: by probability


def test_stacked_objective_is_its_parts_side_by_side():
    x = torch.randn(5, 1, 8, 8)
    a, b = ClassVisualisation(Brightness(), 1), Disagreement(Brightness(), Dim(), torch.tensor([0, 1, 1]))
    stacked = Stacked([(a, 2), (b, 3)])
    assert torch.allclose(stacked(x), torch.cat([a(x[:2]), b(x[2:])]))
    assert stacked.target.tolist() == [1, 1, 0, 1, 1]


def test_two_way_disagreement_flips_the_direction_by_row():
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 0, 1, 0])
    two = Disagreement(Brightness(), Dim(), t, torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert torch.allclose(two(x)[:2], Disagreement(Brightness(), Dim(), t[:2])(x[:2]))
    assert torch.allclose(two(x)[2:], Disagreement(Dim(), Brightness(), t[2:])(x[2:]))


def test_packing_questions_into_shared_batches_does_not_change_an_image():
    den, cfg = gaussian_prior(), GuidanceConfig(iterations=5, lr=0.2)
    from overinterp.explain.ddim import initial_noise

    def request(seeds, target):
        t = torch.full((len(seeds),), target)
        return Request(lambda sl: ClassVisualisation(Brightness(), t[sl]), initial_noise(seeds, den.shape), torch.tensor(seeds))

    reqs = [request([0, 1, 2], 1), request([3, 4], 0)]
    for batch in (2, 3, 128):  # split requests, requests packed together, everything in one batch
        out = generate_requests(den, reqs, MEAN, STD, cfg, batch=batch)
        assert [len(r.images) for r in out] == [3, 2] and out[1].seeds.tolist() == [3, 4]
        for r, (seeds, target) in zip(out, (([0, 1, 2], 1), ([3, 4], 0))):
            alone = generate(den, ClassVisualisation(Brightness(), target), MEAN, STD, cfg, seeds=seeds)
            assert (r.images.int() - alone.images.int()).abs().max() <= 1  # float sums in another order may round 1 level apart
            assert r.targets.tolist() == [target] * len(seeds)


def test_counterfactuals_turn_dark_images_bright_and_measure_transfer():
    den, start = gaussian_prior(), dark_images(3)
    cfg = GuidanceConfig(steps=10, iterations=20, lr=0.2)
    ans = counterfactuals(den, Brightness(), start, torch.zeros(3, dtype=torch.long), MEAN, STD, cfg, other=Brightness(k=5.0), lam=0.02)
    rows, m = ans.rows, ans.measures
    assert rows["target"].tolist() == [1, 1, 1] and rows["image_index"].tolist() == [0, 1, 2]  # two classes: one target each
    assert (rows["start_image"] == start.numpy()).all()  # the real images, not their reconstructions
    assert (rows["objective_end"] < rows["objective_start"]).all()  # guidance lowered each VCE's loss
    assert m["n"] == 3 and m["success_rate"] == 1.0 and m["mean_l2"] > 0
    assert m["transferred"] == 3 and m["transfer"] == 1.0  # the weaker twin also calls them bright
    constant = counterfactuals(den, Brightness(), start, torch.zeros(3, dtype=torch.long), MEAN, STD, cfg,
                               other=FixedLogits([5.0, 0.0]), lam=0.02)
    assert constant.measures["transfer"] == 0.0  # a model that always says "dark" is never flipped


def test_disagreement_reaches_beyond_the_real_images_in_both_directions():
    den = gaussian_prior()
    real = dark_images(6)  # A calls these 0 and B calls them 1, both surely
    cfg = GuidanceConfig(iterations=20, lr=0.2)
    ans = disagreement(den, {"A": Brightness(), "B": Dim()}, real, MEAN, STD, cfg, seeds=[0, 1, 2, 3], num_classes=2)
    rows, m = ans.rows, ans.measures
    assert list(m) == ["A>B", "B>A"] and rows["direction"].tolist() == ["A>B"] * 4 + ["B>A"] * 4
    assert rows["target"].tolist() == [0, 1, 0, 1] * 2 and rows["seed"].tolist() == [0, 1, 2, 3] * 2
    assert (rows["start_image"][:4] == rows["start_image"][4:]).all()  # same noise both ways
    for direction, d in m.items():
        assert d["n"] == 4 and d["mean_gap"] > d["unguided_mean_gap"]
        mine = rows["direction"] == direction
        assert abs(d["mean_gap"] - rows["gap"][mine].mean()) < 1e-9
        assert np.allclose(rows["objective_end"][mine], -rows["gap"][mine], atol=1e-6)  # the direction's own loss, -p_first + p_second
    # Brightness and Dim are opposites: every guided image is one both call by opposite names
    assert m["A>B"]["success"] == 1.0 and m["B>A"]["success"] == 1.0
