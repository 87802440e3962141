"""Guided counterfactuals on the digits (overinterp/explain): a diffusion prior trained here, the two
guidance methods per objective, and the measures, against unguided samples and pixel-space PGD.

1. Classifiers: digits_cnn A (seed 0, the one explained), B (seed 1, for transfer) and F (seed 2,
   the feature network of the Fréchet distance and never attacked), trained on the real train split.
2. The prior: PriorConfig (--prior-steps) trained on the train split, cached in --cache under a
   name fixed by its training settings and data, and resumed from there (a larger --prior-steps
   continues the cached run).
3. Speed: images/s of every objective (VCE, disagreement A vs B, class visualisation) by every
   method ("noise", "universal"), one batch each, with its success rate: VCE and class
   visualisation p_A(target) ≥ 0.9; disagreement p_A(c) ≥ 0.9 while B predicts another class.
4. Measures, for --images test images that A classifies right, each with a random other class as
   target: success against A, transfer to B, mean L2 distance to the start (normalised units),
   Fréchet distance to the real test images on F's features, and the accuracy of a tiny
   real-vs-generated discriminator (0.5 = indistinguishable) — for real train images (the floor),
   unguided samples, VCEs by each method, and targeted L2 PGD at the smallest radius that reaches
   the default method's VCE success rate.

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/bench_explain.py [--prior-steps 2000] [--images 128] [--threads 1] [--cache DIR]
                                          [--json-out FILE] [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from _common import describe, finish, machine, parser, start, timed, torch_threads  # first: it puts this checkout on sys.path
from overinterp.data import load_dataset
from overinterp.explain.guided import METHODS, GuidanceConfig, generate
from overinterp.explain.measures import (
    discriminator_accuracy, distance, frechet_distance, penultimate_features, pgd_at_success_rate, transfer,
    vce_success,
)
from overinterp.explain.objectives import VCE, ClassVisualisation, Disagreement
from overinterp.explain.pixels import uint8_to_classifier
from overinterp.explain.prior import PriorConfig, as_denoiser, fingerprint, sample, train_prior
from overinterp.models import create_model
from overinterp.training import TrainConfig, evaluate, predict, train_model

CPU = torch.device("cpu")
PGD_RADII = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # L2 in [0, 1] pixel units over the 64 pixels


def classifier(ds, seed: int, epochs: int):
    torch.manual_seed(seed)
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    x, y = torch.from_numpy(ds.images["train"]), torch.from_numpy(ds.labels["train"])
    train_model(model, x, y, ds.mean, ds.std, TrainConfig(epochs=epochs, batch_size=128, lr=0.05, seed=seed))
    return model.eval()


def cached_prior(ds, config: PriorConfig, cache: str):
    """Train (or continue) the prior in a cache folder named by its training settings and data."""
    images = ds.images["train"]
    key = hashlib.sha256(json.dumps(config.training_fields(), sort_keys=True).encode() + fingerprint(images, ds.mean, ds.std).encode())
    folder = os.path.join(cache, f"prior-{key.hexdigest()[:12]}")
    (unet, losses), seconds = timed(lambda: train_prior(images, ds.mean, ds.std, config, checkpoint_dir=folder), CPU)
    return unet, losses, seconds, folder


def measure(name, images, starts, targets, models, ds, real_test, seconds=None):
    """One row of the measures table; starts/targets None for images that are not counterfactuals."""
    A, B, F = models
    row = {"images": name, "n": int(images.shape[0]), "images_per_s": None if seconds is None else images.shape[0] / seconds}
    if targets is not None:
        ok = vce_success(A, images, targets, ds.mean, ds.std)
        moved = transfer(ok, B, images, targets, ds.mean, ds.std)
        row.update(success=float(ok.float().mean()), transfer=None if moved["succeeded_a"] == 0 else moved["rate"],
                   l2=float(distance(images, starts, ds.mean, ds.std, "l2").mean()),
                   l2_success=float(distance(images[ok], starts[ok], ds.mean, ds.std, "l2").mean()) if ok.any() else None)
    row["frechet"] = frechet_distance(penultimate_features(F, images, ds.mean, ds.std), penultimate_features(F, real_test, ds.mean, ds.std))
    row["discriminator"] = discriminator_accuracy(real_test, images, ds.mean, ds.std, epochs=20)
    return row


def speed(den, models, ds, cfg: GuidanceConfig, objective: str, n: int, starts, targets, lam: float):
    A, B, _ = models
    if objective == "vce":
        obj = VCE(A, targets[:n], uint8_to_classifier(starts[:n], ds.mean, ds.std), lam=lam)
        run = lambda: generate(den, obj, ds.mean, ds.std, cfg, start=starts[:n])  # noqa: E731
    else:
        obj = Disagreement(A, B, targets[:n]) if objective == "disagreement" else ClassVisualisation(A, targets[:n])
        run = lambda: generate(den, obj, ds.mean, ds.std, cfg, seeds=list(range(n)))  # noqa: E731
    res, seconds = timed(run, CPU)
    ok = vce_success(A, res.images, res.targets, ds.mean, ds.std)
    if objective == "disagreement":
        ok &= predict(B, res.images, ds.mean, ds.std) != res.targets
    return res, {"objective": objective, "method": cfg.method, "n": n, "images_per_s": n / seconds, "success": float(ok.float().mean()),
                 "objective_start": float(res.objective_start.mean()), "objective_end": float(res.objective_end.mean())}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads (this is a CPU benchmark)")
    p.add_argument("--prior-steps", type=int, default=2000)
    p.add_argument("--images", type=int, default=128, help="VCEs (and unguided samples) measured")
    p.add_argument("--speed-images", type=int, default=16, help="images per objective and method in the speed table")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--guide-steps", type=int, default=10, help="DDIM steps of the guided chain")
    p.add_argument("--iterations", type=int, default=50, help="'noise': Adam iterations on x_T")
    p.add_argument("--lr", type=float, default=0.1, help="'noise': Adam's learning rate on x_T")
    p.add_argument("--scale", type=float, default=2.0, help="'universal': guidance scale")
    p.add_argument("--lam", type=float, default=0.05, help="VCE: weight of the L1 distance (normalised units)")
    p.add_argument("--default-method", default="noise", choices=sorted(METHODS), help="the method PGD is matched to")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "overinterp", "bench_explain"))
    p.add_argument("--quick", action="store_true", help="a small prior (100 steps), 8 VCEs, 4 images per speed cell: a smoke test")
    args = p.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args):
    started = start()
    ds = load_dataset("digits")
    if args.quick:
        prior_cfg = PriorConfig(steps=100, channels=(16, 32), batch_size=64, checkpoint_every=50)
        n_vce, n_speed, epochs, iterations = 8, 4, 5, 5
    else:
        prior_cfg = PriorConfig(steps=args.prior_steps)
        n_vce, n_speed, epochs, iterations = args.images, args.speed_images, args.classifier_epochs, args.iterations
    models = tuple(classifier(ds, seed, epochs) for seed in (0, 1, 2))
    x_test, y_test = torch.from_numpy(ds.images["test"]), torch.from_numpy(ds.labels["test"])
    accuracy = [evaluate(m, x_test, y_test, ds.mean, ds.std) for m in models]
    unet, losses, prior_seconds, folder = cached_prior(ds, prior_cfg, args.cache)
    den = as_denoiser(unet, prior_cfg)

    right = torch.nonzero(predict(models[0], x_test, ds.mean, ds.std) == y_test).squeeze(1)[:n_vce]
    starts, labels = x_test[right], y_test[right]
    rng = np.random.default_rng(0)
    targets = (labels + torch.from_numpy(rng.integers(1, 10, len(labels)))) % 10  # a random other class

    cfgs = {m: GuidanceConfig(method=m, steps=args.guide_steps, iterations=iterations, lr=args.lr, scale=args.scale) for m in METHODS}
    speeds = [speed(den, models, ds, cfgs[m], o, min(n_speed, len(starts)), starts, targets, args.lam)[1]
              for o in ("vce", "disagreement", "class_visualisation") for m in METHODS]

    rows = [measure("real train (floor)", torch.from_numpy(ds.images["train"][: len(x_test)]), None, None, models, ds, x_test)]
    unguided, t_unguided = timed(lambda: sample(unet, prior_cfg, max(n_vce, 8), 10_000), CPU)
    rows.append(measure("unguided samples", unguided, None, None, models, ds, x_test, t_unguided))
    vce_rows = {}
    for m in METHODS:
        obj = VCE(models[0], targets, uint8_to_classifier(starts, ds.mean, ds.std), lam=args.lam)
        res, seconds = timed(lambda: generate(den, obj, ds.mean, ds.std, cfgs[m], start=starts), CPU)
        vce_rows[m] = measure(f"VCE, {m}", res.images, starts, targets, models, ds, x_test, seconds)
        rows.append(vce_rows[m])
    rate = vce_rows[args.default_method]["success"]
    pgd, t_pgd = timed(lambda: pgd_at_success_rate(models[0], starts, targets, ds.mean, ds.std, max(rate, 1e-9), PGD_RADII, "l2"), CPU)
    rows.append(measure(f"PGD L2, eps {pgd['eps']}", pgd["images"], starts, targets, models, ds, x_test, t_pgd))

    tenth = max(1, len(losses) // 10)
    report = {"machine": machine(CPU, ("diffusers",)), "quick": args.quick, "prior_config": prior_cfg.training_fields() | {"steps": prior_cfg.steps},
              "prior_train_seconds_this_run": prior_seconds, "prior_loss_first_tenth": float(np.mean(losses[:tenth])),
              "prior_loss_last_tenth": float(np.mean(losses[-tenth:])), "prior_cache": folder, "classifier_accuracy": accuracy,
              "guidance": {m: asdict(cfgs[m]) for m in cfgs} | {"vce_lam": args.lam}, "speed": speeds, "measures": rows,
              "pgd_eps": pgd["eps"], "pgd_matched_to": args.default_method}

    print(f"\nGuided counterfactuals on the digits, CPU ({describe(report['machine'])})")
    print(f"classifiers A, B, F test accuracy: {', '.join(f'{a:.3f}' for a in accuracy)}; prior {prior_cfg.steps} steps "
          f"(loss, first and last tenth {report['prior_loss_first_tenth']:.3f} -> {report['prior_loss_last_tenth']:.3f}; {prior_seconds:.0f} s this run)")
    print(f"\n{'objective':>20}{'method':>11}{'images':>8}{'img/s':>9}{'success':>9}{'objective start -> end':>25}")
    for s in speeds:
        print(f"{s['objective']:>20}{s['method']:>11}{s['n']:>8}{s['images_per_s']:>9.2f}{s['success']:>9.0%}"
              f"{s['objective_start']:>13.3f} -> {s['objective_end']:<8.3f}")
    print(f"\n{'images':>22}{'n':>5}{'img/s':>9}{'success':>9}{'transfer':>9}{'L2':>7}{'L2 ok':>7}{'Frechet':>9}{'disc. acc':>10}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"{r['images']:>22}{r['n']:>5}{fmt(r['images_per_s'], '.2f'):>9}{fmt(r.get('success'), '.0%'):>9}"
              f"{fmt(r.get('transfer'), '.0%'):>9}{fmt(r.get('l2'), '.2f'):>7}{fmt(r.get('l2_success'), '.2f'):>7}"
              f"{r['frechet']:>9.2f}{r['discriminator']:>10.2f}")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
