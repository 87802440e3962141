"""The questions `overinterp run --explain` asks with guided generation, as plain functions of a
prior (a ddim.Denoiser) and trained classifiers:

- counterfactuals: what change turns each of a few test images into each other class, for the
  explained model (VCEs from the images' DDIM inversions); success, distance to the real image,
  and transfer to an independently trained model;
- disagreement: images that model A calls class c and model B does not, in both directions from
  the same seeded noise and targets (the full-image model against the model trained on its 5%
  subsets, the plain model against its input-dropout twin, two seeds), measured against the
  most-disagreeing real test images.

Images are uint8 (N, C, H, W) in and out; the classifiers take normalised images. Each question is a
Request (its objective and starting noise) and an answer function; generate_requests packs the
requests of all questions into shared guided batches on the prior's device. The pipeline (pipeline/explain_stage.py)
trains or loads the prior, picks the models, and writes Parquet rows and galleries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from overinterp.explain import MAX_VCE_TARGETS
from overinterp.explain.ddim import initial_noise
from overinterp.explain.guided import GuidanceConfig, GuidedResult, generate_from, start_noise
from overinterp.explain.measures import distance, probabilities, target_probability, transfer
from overinterp.explain.objectives import VCE, Disagreement, targets_of
from overinterp.explain.pixels import uint8_to_classifier
from overinterp.models import device_of

SUCCESS_P = 0.9  # a VCE succeeds, and a disagreement image counts, where the model's p(target) reaches this


@dataclass
class Answer:
    """One question's generated images and measures.

    rows: Parquet-ready numpy columns, one row per generated image (uint8 images as (N, C, H, W));
    measures: the numbers summary.json and MLflow report (floats, counts, nan where undefined).
    """

    question: str
    rows: dict[str, np.ndarray]
    measures: dict = field(default_factory=dict)


def vce_targets(probs: torch.Tensor, max_targets: int) -> torch.Tensor:
    """(N, T) target classes per image: every other class when there are at most max_targets of
    them (T = classes - 1, in class order), else the max_targets most probable other classes."""
    n, c = probs.shape
    if c - 1 <= max_targets:
        pred = probs.argmax(1, keepdim=True)
        every = torch.arange(c).expand(n, c)
        return every[every != pred].view(n, c - 1)
    ranked = probs.argsort(1, descending=True)
    return ranked[:, 1:max_targets + 1]


@dataclass
class Request:
    """One question's rows of a guided batch: make(rows) builds its objective over a slice of
    them, x_T (n, C, H, W) its starting noise (diffusion units), seeds (n,) int64 (-1: an inversion)."""

    make: Callable[[slice], object]
    x_T: torch.Tensor
    seeds: torch.Tensor

    def __len__(self) -> int:
        return self.x_T.shape[0]


class Stacked:
    """Objectives over consecutive rows of one batch: their (B,) losses side by side, so that
    several questions share one guided chain (a chain's UNet calls cost nearly the same for 3
    images as for 60 on a CPU)."""

    name = "stacked"

    def __init__(self, parts: list[tuple[object, int]]):
        self.parts = parts
        self.target = torch.cat([targets_of(o, n) for o, n in parts])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([objective(part) for (objective, _), part in zip(self.parts, x.split([n for _, n in self.parts]))])


def generate_requests(den, requests: list[Request], mean, std, config: GuidanceConfig, batch: int = 128) -> list[GuidedResult]:
    """Every request's images, packed into guided batches of at most `batch` rows (a request split
    where it does not fit); one GuidedResult per request, rows in its order."""
    pieces = [(r, slice(s, min(s + batch, len(r)))) for r in requests for s in range(0, len(r), batch)]
    groups, size = [[]], 0
    for piece in pieces:
        n = piece[1].stop - piece[1].start
        if size + n > batch and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += n
    results = []
    for group in groups:
        objective = Stacked([(r.make(sl), sl.stop - sl.start) for r, sl in group])
        x_T = torch.cat([r.x_T[sl] for r, sl in group])
        results.append(generate_from(den, objective, mean, std, config, x_T, torch.cat([r.seeds[sl] for r, sl in group])))
    # the groups are consecutive runs of the pieces, which follow the requests in order: join them, then cut per request
    columns = {k: torch.cat([getattr(res, k) for res in results]).split([len(r) for r in requests])
               for k in ("images", "start_images", "objective_start", "objective_end", "targets", "seeds")}
    return [GuidedResult(**{k: v[i] for k, v in columns.items()}, method=config.method, objective="stacked") for i in range(len(requests))]


def vce_request(den, model: nn.Module, images: torch.Tensor, mean, std, config: GuidanceConfig, max_targets: int = MAX_VCE_TARGETS,
                lam: float = 0.05) -> tuple[Request, torch.Tensor]:
    """(the VCEs' Request, (N*T,) targets): each uint8 image towards each of its vce_targets
    classes, from its DDIM inversion, with objectives.VCE (lam: its L1 distance weight)."""
    device = device_of(den.net)
    targets = vce_targets(probabilities(model, images, mean, std), max_targets)  # (N, T)
    t = targets.shape[1]
    target = targets.flatten()
    start_norm = uint8_to_classifier(images, mean, std).to(device).repeat_interleave(t, 0)  # image i's T rows together
    x_T = start_noise(den, images, config.steps).repeat_interleave(t, 0)
    request = Request(lambda sl: VCE(model, target[sl].to(device), start_norm[sl], lam=lam), x_T,
                      torch.full((len(target),), -1, dtype=torch.long))
    return request, target


def vce_answer(res: GuidedResult, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
               other: Optional[nn.Module] = None) -> Answer:
    """Answer "vce" of vce_request's images: rows per VCE (image, start_image the real image,
    target, p_target, success, l2, image_index, label); measures n, success_rate, mean_l2 (of the
    successes), transfer (to `other`, an independently trained model; nan without one)."""
    target = res.targets
    t = len(target) // len(images)
    start = images.repeat_interleave(t, 0)
    p = target_probability(model, res.images, target, mean, std)
    ok = p >= SUCCESS_P
    l2 = distance(res.images, start, mean, std, "l2")
    measures = {"n": len(target), "success_rate": float(ok.double().mean()),
                "mean_l2": float(l2[ok].mean()) if ok.any() else float("nan"), "transfer": float("nan"), "transferred": 0}
    if other is not None:
        tr = transfer(ok, other, res.images, target, mean, std)
        measures.update(transfer=tr["rate"], transferred=tr["transferred"])
    rows = {"image": res.images.numpy(), "start_image": start.numpy(), "target": target.numpy(), "p_target": p.numpy(),
            "success": ok.numpy(), "l2": l2.double().numpy(), "image_index": np.repeat(np.arange(len(images)), t),
            "label": labels.repeat_interleave(t).numpy(), "seed": res.seeds.numpy(), "method": np.array([res.method] * len(target)),
            "objective_start": res.objective_start.numpy(), "objective_end": res.objective_end.numpy()}
    return Answer("vce", rows, measures)


def counterfactuals(den, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, config: GuidanceConfig,
                    other: Optional[nn.Module] = None, max_targets: int = MAX_VCE_TARGETS, lam: float = 0.05, batch: int = 128) -> Answer:
    """VCEs of `model` for uint8 images (N, C, H, W) with true labels (N,): vce_request, generated, vce_answer."""
    request, _ = vce_request(den, model, images, mean, std, config, max_targets, lam)
    (res,) = generate_requests(den, [request], mean, std, config, batch)
    return vce_answer(res, model, images, labels, mean, std, other)


def real_gaps(model_a: nn.Module, model_b: nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    """(N,) max over classes c of p_A(c) - p_B(c) on real images: how far apart the two models are
    on each real image, at the class where they are furthest apart."""
    return (probabilities(model_a, images, mean, std) - probabilities(model_b, images, mean, std)).max(1).values


def disagreement_request(den, model_a: nn.Module, model_b: nn.Module, seeds: list[int], num_classes: int) -> Request:
    """2n rows from n seeds: rows [0, n) guided towards A > B, rows [n, 2n) towards B > A, row i
    (and n + i) from seed i's noise towards class i mod num_classes."""
    device = device_of(den.net)
    n = len(seeds)
    target = (torch.arange(n) % num_classes).repeat(2)
    sign = torch.cat([torch.ones(n), -torch.ones(n)])
    x_T = initial_noise(list(seeds) * 2, den.shape, device)
    return Request(lambda sl: Disagreement(model_a, model_b, target[sl].to(device), sign[sl]), x_T,
                   torch.as_tensor(list(seeds) * 2, dtype=torch.long))


def disagreement_answer(res: GuidedResult, models: dict[str, nn.Module], real_images: torch.Tensor, mean, std) -> Answer:
    """Answer "disagree" of disagreement_request's images, per direction "A>B": rows (image,
    start_image the unguided sample, target, p_first, p_second, gap = p_first - p_second,
    direction); measures: mean_gap of the guided and unguided images, real_top_gap (the mean gap
    of as many most-disagreeing real test images), real_max_gap, share_beyond_real (guided gaps
    above the largest real one), success (p_first >= SUCCESS_P while the other model predicts
    another class)."""
    (name_a, a), (name_b, b) = models.items()
    n = len(res.targets) // 2
    rows: dict[str, list] = {}
    measures = {}
    for half, (first, second, direction) in enumerate(((a, b, f"{name_a}>{name_b}"), (b, a, f"{name_b}>{name_a}"))):
        sl = slice(half * n, (half + 1) * n)
        images, starts, target = res.images[sl], res.start_images[sl], res.targets[sl]
        p1, p2 = (target_probability(m, images, target, mean, std) for m in (first, second))
        gap = p1 - p2
        unguided = target_probability(first, starts, target, mean, std) - target_probability(second, starts, target, mean, std)
        real = real_gaps(first, second, real_images, mean, std)
        other_pred = probabilities(second, images, mean, std).argmax(1)
        measures[direction] = {"n": n, "mean_gap": float(gap.mean()), "unguided_mean_gap": float(unguided.mean()),
                               "real_top_gap": float(real.topk(min(n, len(real))).values.mean()), "real_max_gap": float(real.max()),
                               "share_beyond_real": float((gap > real.max()).double().mean()),
                               "success": float(((p1 >= SUCCESS_P) & (other_pred != target)).double().mean())}
        for k, v in {"image": images.numpy(), "start_image": starts.numpy(), "target": target.numpy(), "p_first": p1.numpy(),
                     "p_second": p2.numpy(), "gap": gap.numpy(), "seed": res.seeds[sl].numpy(),
                     "objective_start": res.objective_start[sl].numpy(), "objective_end": res.objective_end[sl].numpy(),
                     "direction": np.array([direction] * n), "method": np.array([res.method] * n)}.items():
            rows.setdefault(k, []).append(v)
    return Answer("disagree", {k: np.concatenate(v) for k, v in rows.items()}, measures)


def disagreement(den, models: dict[str, nn.Module], real_images: torch.Tensor, mean, std, config: GuidanceConfig,
                 seeds: list[int], num_classes: int, batch: int = 128) -> Answer:
    """Images where one model of a pair ({name A: A, name B: B}) calls class c and the other does
    not, both directions from the same seeds and targets, against real test images (uint8)."""
    request = disagreement_request(den, *models.values(), seeds, num_classes)
    (res,) = generate_requests(den, [request], mean, std, config, batch)
    return disagreement_answer(res, models, real_images, mean, std)
