"""Exact tail: how close fast removal + an exact tail comes to exact backward selection, and at what cost.

On digits upsampled to 32x32 (`load_digits(image_size=32)`) and a small CNN trained here (seeded),
every selector runs on the same test images as exact BS (k = 1):
  backselect, k per step until ceil(F·HW) pixels remain, then exact — F in {0.05, 0.1, 0.2, 0.5},
      k in {4, 16, 64}; and k per step to the end (F = 1, today's approximation), k in {4, 16, 64};
  bgsis (k = 16) with F in {0.05, 0.1, 0.2} and without a tail;
  or, with --grid bgsis, exact BS against bgsis over the whole grid (k in {4, 16, 64}, F in
      {0.05, 0.1, 0.2, 0.5} and without a tail).
Reported per selector, against exact on the same images:
  forward passes (the engines' counters; equal to selection/cost.py's plan) and wall time, as ratios;
  mean Jaccard overlap of the 5% subsets (52 of 1,024 pixels); median |SIS size - exact's| at
  tau = 0.99 over the images with an SIS; and, for exact and every selector with >= 10x fewer passes
  (the only ones that could become the default), the accuracy of small CNNs trained and tested on
  the selector's 5% subsets: stratified K-fold cross-validation over the selected images, several
  seeds (mean and standard deviation over seeds), beside full images and random 5% subsets.

Cost decides the design: exact BS is HW(HW+1)/2 = 524,800 forward passes per 32x32 image. The
benchmark times exact BS on two images first, then picks how many images it can afford within
--budget-min: N_fid images get every selector, N_extra more get exact + the accuracy selectors
(the accuracy pool is all N_fid + N_extra). The selection model is a strided CNN (3x3 convs with
stride 2, max-pool) — the digits CNN's layers at 1/14 of its multiply-adds, because the digits CNN
runs ~3,000 images/s at 32x32 on 2 cores, i.e. ~3 min of exact BS per image.

Prints a human table and one line starting with BENCH_JSON; --json-out and --plot save them.
CIFAR-10 (--cifar-root DIR holding cifar-10-batches-py/) runs the same protocol on a second
model when the files are there, and is skipped (with a line saying so) when they are not.

Usage:
  python benchmarks/exact_tail.py --budget-min 75 --json-out benchmarks/results/exact-tail-cpu-2core-2026-11-23.json \\
      --plot benchmarks/results/exact-tail-pareto.png --cache /tmp/exact_tail_cache.pt
  python benchmarks/exact_tail.py --quick      # 12x12 images, a handful of them: a smoke test
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import finish, machine, parser, start, timed, torch_threads  # first: it puts this checkout on sys.path
from overinterp.data import DataError, ImageDataset, load_cifar10, load_digits, normalize
from overinterp.models import DigitsCNN
from overinterp.selection import (
    NO_SIS,
    REMOVAL_SELECTORS,
    EngineConfig,
    keep_mask,
    planned_backward_passes,
    planned_forward_passes,
    random_order,
    run_selector,
    selector_params,
    selector_tag,
    sis_size,
)
from overinterp.selection.engine import max_chunk, tune_chunk
from overinterp.training import TrainConfig, evaluate, train_model

TAILS = (0.05, 0.1, 0.2, 0.5)
KS = (4, 16, 64)
BGSIS_K = 16
BGSIS_TAILS = (0.05, 0.1, 0.2)
FRACTION = 0.05  # the paper's pixel subset
TAU = 0.99  # the paper's SIS threshold
MIN_FEWER = 10.0  # the cost target: >= 10x fewer forward passes than exact
MIN_JACCARD = 0.95


class StridedCNN(DigitsCNN):
    """The digits CNN with stride-2 convolutions (8, then 16 channels) -> max-pool to 4x4 -> linear:
    ~92k multiply-adds at 32x32. Same layers, so the same seed gives the same weights."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__(num_classes, in_channels, width)
        self.conv1.stride = self.conv2.stride = (2, 2)


@dataclass(frozen=True)
class Variant:
    selector: str
    k: int
    tail: float

    @property
    def tag(self) -> str:
        return selector_tag(self.selector, self.params)

    @property
    def params(self) -> dict:
        """As a run stores them: no k-step crosses the 5% subset's boundary."""
        return selector_params(self.selector, self.k, self.tail, keep_fraction=FRACTION)

    @property
    def label(self) -> str:
        if self.selector == "backselect" and self.k == 1:
            return "exact BS"
        name = "BS" if self.selector == "backselect" else "BGSIS"
        return f"{name} k={self.k}" + (f" F={self.tail:g}" if self.tail < 1 else " (no tail)")


EXACT = Variant("backselect", 1, 1.0)


def variants(grid: str = "backselect") -> list[Variant]:
    """Exact BS first, then the selectors compared with it. grid "backselect": the k-per-step grid
    (k x F, and k without a tail) and BGSIS at k = 16; "bgsis": the same k x F grid for BGSIS."""
    out = [EXACT]
    if grid == "bgsis":
        return out + [Variant("bgsis", k, f) for f in (*TAILS, 1.0) for k in KS]
    out += [Variant("backselect", k, f) for f in TAILS for k in KS]
    out += [Variant("backselect", k, 1.0) for k in KS]
    out += [Variant("bgsis", BGSIS_K, f) for f in BGSIS_TAILS] + [Variant("bgsis", BGSIS_K, 1.0)]
    return out


def fewer(v: Variant, hw: int) -> float:
    """How many times fewer forward passes than exact BS (planned, per image)."""
    return planned_forward_passes("backselect", hw) / planned_forward_passes(v.selector, hw, v.k, v.tail, keep_fraction=FRACTION)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data and models ------------------------------------------------------------------------


def stratified_pool(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices of a split, classes interleaved (round-robin over a seeded shuffle of each class),
    so any prefix of the pool is close to class-balanced."""
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    out = []
    while len(out) < min(n, len(labels)):
        for idx in per_class:
            if idx and len(out) < n:
                out.append(idx.pop(0))
    return np.array(out)


def train_selection_model(data: ImageDataset, epochs: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = StridedCNN(data.num_classes, data.shape[0])
    x, y = torch.from_numpy(data.images["train"]), torch.from_numpy(data.labels["train"])
    train_model(model, x, y, data.mean, data.std, TrainConfig(epochs=epochs, lr=0.05, seed=seed))
    acc = evaluate(model, torch.from_numpy(data.images["test"]), torch.from_numpy(data.labels["test"]), data.mean, data.std)
    return model.eval(), acc


# --- selection ------------------------------------------------------------------------------


class Cache:
    """Selection results per variant for a prefix of the pool, saved after every batch (resumable)."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = torch.load(path, weights_only=True) if path and os.path.exists(path) else {}  # tensors and plain values only

    def get(self, key: str) -> dict:
        return self.data.setdefault(key, {"order": [], "curve": [], "confidence": [], "seconds": 0.0, "passes": 0, "backward": 0})

    def save(self) -> None:
        if self.path:
            torch.save(self.data, self.path + ".tmp")
            os.replace(self.path + ".tmp", self.path)


def select(model, images: torch.Tensor, v: Variant, n: int, batch: int, engine: EngineConfig, cache: Cache, key: str) -> dict:
    """Run variant v on the first n pool images (those not cached yet), in batches; returns the entry."""
    entry = cache.get(key)
    done = sum(len(o) for o in entry["order"])
    for first in range(done, n, batch):
        x = images[first : min(first + batch, n)]
        res, dt = timed(lambda: run_selector(v.selector, model, x, v.params, engine), x.device)
        entry["order"].append(res.order.to(torch.int16))
        entry["curve"].append(res.curve)
        entry["confidence"].append(res.confidence)
        entry["seconds"] += dt
        entry["passes"] += res.forward_passes
        entry["backward"] += res.backward_passes
        hw = x.shape[2] * x.shape[3]
        assert res.forward_passes == planned_forward_passes(v.selector, hw, v.k, v.tail, batch=len(x), keep_fraction=FRACTION)
        assert res.backward_passes == planned_backward_passes(v.selector, hw, v.k, v.tail, batch=len(x), keep_fraction=FRACTION)
        cache.save()
        log(f"  {v.label:<22} images {first + len(x):>4}/{n}  {dt:7.1f} s  ({res.forward_passes / dt:,.0f} passes/s)")
    return entry


def stacked(entry: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.cat(entry["order"])[:n].long()
    return order, torch.cat(entry["curve"])[:n], torch.cat(entry["confidence"])[:n]


# --- fidelity -------------------------------------------------------------------------------


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) |A ∩ B| / |A ∪ B| of two (N, HW) boolean masks."""
    return (a & b).sum(1).float() / (a | b).sum(1).float()


def near_hits(ref: torch.Tensor, got: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N,) fraction of `got`'s pixels within one pixel (8-neighbourhood) of a `ref` pixel: whether a
    subset that differs from exact's picks the same places or different ones."""
    H, W = shape
    grown = F.max_pool2d(ref.view(-1, 1, H, W).float(), 3, stride=1, padding=1).view(-1, H * W) > 0
    return (got & grown).sum(1).float() / got.sum(1).float()


def fidelity(ref: dict, got: dict, n: int, shape: tuple[int, int]) -> dict:
    r_order, r_curve, r_conf = stacked(ref, n)
    g_order, g_curve, g_conf = stacked(got, n)
    r_keep, g_keep = keep_mask(r_order, FRACTION), keep_mask(g_order, FRACTION)
    jac = jaccard(r_keep, g_keep)
    r_sis, g_sis = sis_size(r_curve, r_conf, TAU), sis_size(g_curve, g_conf, TAU)
    both = (r_sis != NO_SIS) & (g_sis != NO_SIS)
    diff = (r_sis[both] - g_sis[both]).abs().float()
    return {
        "jaccard_mean": float(jac.mean()),
        "jaccard_min": float(jac.min()),
        "jaccard_sd": float(jac.std()) if n > 1 else 0.0,
        "within_1px": float(near_hits(r_keep, g_keep, shape).mean()),
        "sis_images": int(both.sum()),
        "sis_median_abs_diff": float(diff.median()) if len(diff) else None,
        "sis_mean_abs_diff": float(diff.mean()) if len(diff) else None,
        "sis_median_exact": float(r_sis[both].float().median()) if len(diff) else None,
    }


# --- accuracy on 5% subsets -----------------------------------------------------------------


def stratified_folds(labels: torch.Tensor, folds: int) -> torch.Tensor:
    """(N,) fold of each image: the images dealt round-robin over the folds class by class, so each
    fold holds every class about equally and the folds differ in size by at most one (a plain
    i % K over a class-interleaved pool ties classes to folds when K and the class count share a factor)."""
    by_class = torch.cat([(labels == c).nonzero().squeeze(1) for c in labels.unique()])
    fold_of = torch.empty_like(labels)
    fold_of[by_class] = torch.arange(len(labels)) % folds
    return fold_of


def cv_accuracy(images: torch.Tensor, labels: torch.Tensor, keep, data: ImageDataset, folds: int, seed: int, epochs: int) -> float:
    """Mean held-out accuracy of stratified K-fold cross-validation over the given images."""
    fold_of = stratified_folds(labels, folds)
    accs = []
    for f in range(folds):
        tr, te = fold_of != f, fold_of == f
        torch.manual_seed(1000 * seed + f)
        model = StridedCNN(data.num_classes, data.shape[0])
        cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=seed)
        train_model(model, images[tr], labels[tr], data.mean, data.std, cfg, keep=None if keep is None else keep[tr])
        accs.append(evaluate(model, images[te], labels[te], data.mean, data.std, None if keep is None else keep[te]))
    return statistics.fmean(accs)


def subset_accuracy(images, labels, keeps: dict, data, folds: int, seeds: int, epochs: int) -> dict:
    out = {}
    for name, keep in keeps.items():
        runs = [cv_accuracy(images, labels, keep, data, folds, s, epochs) for s in range(seeds)]
        out[name] = {"mean": statistics.fmean(runs), "sd": statistics.stdev(runs) if seeds > 1 else 0.0, "runs": runs}
        log(f"  accuracy {name:<24} {out[name]['mean']:.3f} ± {out[name]['sd']:.3f}  ({', '.join(f'{a:.3f}' for a in runs)})")
    return out


# --- one data set ---------------------------------------------------------------------------


def choose_n(seconds_per_exact: float, hw: int, budget_s: float, acc_variants: list[Variant], all_variants: list[Variant],
             train_reserve_s: float, max_pool: int) -> tuple[int, int, dict]:
    """N_fid (every selector) and N_extra (exact + accuracy selectors) that fit the budget.

    The cost of an image under a selector is its planned passes / exact's, times the measured
    seconds of exact BS per image. 40% of the selection time goes to the fidelity images, the rest
    to more images for the subset-accuracy pool (which includes the fidelity images).
    """
    exact = planned_forward_passes("backselect", hw)
    per_fid = seconds_per_exact * sum(planned_forward_passes(v.selector, hw, v.k, v.tail, keep_fraction=FRACTION) for v in all_variants) / exact
    per_acc = seconds_per_exact * sum(planned_forward_passes(v.selector, hw, v.k, v.tail, keep_fraction=FRACTION) for v in acc_variants) / exact
    selection_s = max(budget_s - train_reserve_s, 0.0)
    n_fid = max(2, int(0.4 * selection_s / per_fid))
    n_extra = max(0, min(max_pool - n_fid, int((selection_s - n_fid * per_fid) / per_acc)))
    plan = {"seconds_per_exact_image": seconds_per_exact, "seconds_per_fidelity_image": per_fid,
            "seconds_per_accuracy_image": per_acc, "selection_budget_s": selection_s}
    return n_fid, n_extra, plan


def run_dataset(name: str, data: ImageDataset, args, engine: EngineConfig, cache: Cache, budget_s: float) -> dict:
    t_start = time.time()
    C, H, W = data.shape
    hw = H * W
    log(f"{name}: {C}x{H}x{W}, training the selection model ({args.model_epochs} epochs, seed {args.seed})")
    model, model_acc = train_selection_model(data, args.model_epochs, args.seed)
    log(f"{name}: selection model test accuracy {model_acc:.3f}")
    all_v = variants(args.grid)
    acc_v = [v for v in all_v if v == EXACT or fewer(v, hw) >= MIN_FEWER]
    pool_idx = stratified_pool(data.labels["test"], len(data.labels["test"]), args.seed)
    pool_u8 = torch.from_numpy(data.images["test"][pool_idx])
    pool_y = torch.from_numpy(data.labels["test"][pool_idx])
    pool = normalize(pool_u8, data.mean, data.std)
    # chunk: tuned once for this model, shared by every selector (the timings compare like with like)
    chunk = args.chunk or tune_chunk(model, pool[:1], max_chunk(model, pool[:1]), True)
    engine = EngineConfig(chunk=chunk, channels_last=engine.channels_last)
    # probe: exact BS on the first two pool images (kept: they are the first fidelity images)
    key = f"{name}-{H}x{W}-seed{args.seed}-epochs{args.model_epochs}"  # what the cached selections depend on
    probe = select(model, pool, EXACT, 2, 2, engine, cache, f"{key}/{EXACT.tag}")
    sec_exact = probe["seconds"] / sum(len(o) for o in probe["order"])  # a resumed cache may hold more images
    with torch.inference_mode():  # a resumed cache must come from this very model
        conf = torch.softmax(model(pool[:2]), 1).max(1).values
    if not torch.allclose(conf, torch.cat(probe["confidence"])[:2].to(conf.dtype), atol=1e-5):
        raise RuntimeError(f"--cache {args.cache} holds selections of another model: remove it or point --cache elsewhere")
    elapsed = time.time() - t_start
    n_fid, n_extra, plan = choose_n(sec_exact, hw, budget_s - elapsed, acc_v, all_v, args.train_reserve_min * 60, len(pool))
    if args.n_fidelity is not None:
        n_fid = args.n_fidelity
    if args.n_extra is not None:
        n_extra = args.n_extra
    n_pool = n_fid + n_extra
    log(f"{name}: exact BS {sec_exact:.1f} s/image (chunk {chunk}) -> N_fid = {n_fid} images for all {len(all_v)} selectors, "
        f"+ {n_extra} for exact and the {len(acc_v) - 1} selectors with >= {MIN_FEWER:g}x fewer passes (pool {n_pool})")

    entries = {}
    for v in all_v:
        n = n_pool if v in acc_v else n_fid
        log(f"{name}: {v.label} on {n} images")
        entries[v] = select(model, pool, v, n, args.batch, engine, cache, f"{key}/{v.tag}")
    ref = entries[EXACT]
    exact_passes_fid = planned_forward_passes("backselect", hw, batch=n_fid)
    exact_sec_fid = ref["seconds"] * n_fid / n_pool  # exact's time per image is uniform enough: pro rata
    rows = []
    for v in all_v:
        e = entries[v]
        n_run = sum(len(o) for o in e["order"])
        passes = planned_forward_passes(v.selector, hw, v.k, v.tail, batch=n_fid, keep_fraction=FRACTION)
        sec_fid = e["seconds"] * n_fid / n_run
        rows.append({"selector": v.selector, "k": v.k, "exact_tail": v.tail, "tag": v.tag, "label": v.label,
                     "passes_per_image": passes // n_fid, "fewer_passes": exact_passes_fid / passes,
                     "backward_per_image": planned_backward_passes(v.selector, hw, v.k, v.tail, keep_fraction=FRACTION),
                     "seconds_per_image": sec_fid / n_fid, "faster_wall": exact_sec_fid / sec_fid,
                     "passes_per_s": e["passes"] / e["seconds"], **fidelity(ref, e, n_fid, (H, W))})

    control = None
    if args.control_images:
        # the noise floor: exact BS once more in float64 — same model, same images, only rounding
        # differs; how far apart two exact runs' subsets can be says what a Jaccard can mean here
        n_ctrl = min(args.control_images, n_fid)
        log(f"{name}: control, exact BS in float64 on {n_ctrl} images")
        m64 = copy.deepcopy(model).double()
        ctrl = select(m64, pool.double(), EXACT, n_ctrl, args.batch, engine, cache, f"{key}/{EXACT.tag}-float64")
        control = {"images": n_ctrl, "seconds_per_image": ctrl["seconds"] / n_ctrl, **fidelity(ref, ctrl, n_ctrl, (H, W))}
    log(f"{name}: subset accuracy, {args.folds}-fold CV over {n_pool} images, {args.seeds} seeds, {args.epochs} epochs")
    keeps = {"full images": None}
    for v in acc_v:
        keeps[v.label] = keep_mask(stacked(entries[v], n_pool)[0], FRACTION)
    keeps["random 5%"] = keep_mask(random_order(pool_idx[:n_pool], hw, seed=args.seed, split="test"), FRACTION)
    acc = subset_accuracy(pool_u8[:n_pool], pool_y[:n_pool], keeps, data, args.folds, args.seeds, args.epochs)
    for r in rows:
        r["accuracy"] = acc.get(r["label"])
    return {"dataset": name, "input": f"{C}x{H}x{W}", "hw": hw, "model": "StridedCNN", "model_test_accuracy": model_acc,
            "chunk": chunk, "n_fidelity": n_fid, "n_extra": n_extra, "n_pool": n_pool, "plan": plan,
            "accuracy": acc, "rows": rows, "control_float64": control, "decision": decide(rows, acc),
            "selection_seconds": sum(e["seconds"] for e in entries.values()), "seconds": time.time() - t_start}


def decide(rows: list[dict], acc: dict) -> dict:
    """The issue's rule: >= 10x fewer passes, mean 5% Jaccard >= 0.95, and no loss of subset accuracy
    beyond the seed spread (exact's mean - variant's mean <= the larger of their seed SDs)."""
    exact = acc["exact BS"]
    ok = []
    for r in rows:
        if r["label"] == "exact BS" or r["fewer_passes"] < MIN_FEWER or r["jaccard_mean"] < MIN_JACCARD or r["accuracy"] is None:
            continue
        if exact["mean"] - r["accuracy"]["mean"] <= max(exact["sd"], r["accuracy"]["sd"]):
            ok.append(r)
    cheap = [r for r in rows if r["fewer_passes"] >= MIN_FEWER]
    best_cheap = max(cheap, key=lambda r: r["jaccard_mean"]) if cheap else None
    faithful = [r for r in rows if r["label"] != "exact BS" and r["jaccard_mean"] >= MIN_JACCARD]
    cheapest_faithful = max(faithful, key=lambda r: r["fewer_passes"]) if faithful else None
    chosen = max(ok, key=lambda r: (r["fewer_passes"], r["jaccard_mean"])) if ok else None
    return {
        "default": None if chosen is None else {"selector": chosen["selector"], "k": chosen["k"], "exact_tail": chosen["exact_tail"]},
        "qualifying": [r["label"] for r in ok],
        "best_jaccard_at_10x": None if best_cheap is None else {"label": best_cheap["label"], "jaccard": best_cheap["jaccard_mean"],
                                                                  "fewer_passes": best_cheap["fewer_passes"]},
        "cheapest_at_jaccard_0.95": None if cheapest_faithful is None else {
            "label": cheapest_faithful["label"], "jaccard": cheapest_faithful["jaccard_mean"], "fewer_passes": cheapest_faithful["fewer_passes"]},
    }


# --- output ---------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    print(f"\n{res['dataset']} {res['input']}: selection model (StridedCNN) test accuracy {res['model_test_accuracy']:.3f}; "
          f"{res['n_fidelity']} images for fidelity, {res['n_pool']} for subset accuracy; chunk {res['chunk']}")
    print(f"{'selector':<22}{'passes/img':>11}{'fewer':>8}{'wall':>8}{'Jaccard 5%':>12}{'min':>6}{'≤1px':>6}{'SIS |d| med':>12}{'accuracy':>16}")
    ex = res["accuracy"]["exact BS"]
    for r in res["rows"]:
        a = r["accuracy"]
        acc = f"{a['mean']:.3f} ± {a['sd']:.3f}" if a else "—"
        sis = f"{r['sis_median_abs_diff']:.0f}" if r["sis_median_abs_diff"] is not None else "—"
        print(f"{r['label']:<22}{r['passes_per_image']:>11,}{r['fewer_passes']:>7.1f}x{r['faster_wall']:>7.1f}x"
              f"{r['jaccard_mean']:>12.3f}{r['jaccard_min']:>6.2f}{r['within_1px']:>6.2f}{sis:>12}{acc:>16}")
    for name in ("full images", "random 5%"):
        a = res["accuracy"][name]
        print(f"{name:<22}{'':>76}{a['mean']:.3f} ± {a['sd']:.3f}")
    c = res["control_float64"]
    if c:
        print(f"control: exact BS in float64 vs float32 on {c['images']} images: Jaccard {c['jaccard_mean']:.3f} (min {c['jaccard_min']:.2f}), "
              f"within 1 px {c['within_1px']:.2f}, SIS |d| median {c['sis_median_abs_diff']}")
    d = res["decision"]
    print(f"exact BS subset accuracy {ex['mean']:.3f} ± {ex['sd']:.3f} (seed SD); median SIS size (exact, tau {TAU}) "
          f"{res['rows'][0]['sis_median_exact']}")
    print(f"decision: default = {d['default']}; qualifying: {d['qualifying']}; best Jaccard at >= 10x: {d['best_jaccard_at_10x']}; "
          f"cheapest with Jaccard >= 0.95: {d['cheapest_at_jaccard_0.95']}")


def pareto_plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(8 * len(results), 5.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["rows"] if r["label"] != "exact BS"]
        styles = {("backselect", True): ("o", "tab:blue", "BS k-steps + exact tail"),
                  ("backselect", False): ("s", "tab:gray", "BS k-steps, no tail"),
                  ("bgsis", True): ("^", "tab:orange", "BGSIS + exact tail (+1 backward per gradient step)"),
                  ("bgsis", False): ("v", "tab:red", "BGSIS, no tail (+1 backward per step)")}
        for (sel, tail), (marker, color, name) in styles.items():
            pts = [r for r in rows if r["selector"] == sel and (r["exact_tail"] < 1) == tail]
            ax.scatter([r["fewer_passes"] for r in pts], [r["jaccard_mean"] for r in pts], marker=marker, color=color, label=name, zorder=3)
            for r in pts:
                short = f"k{r['k']}" + (f" F{r['exact_tail']:g}" if r["exact_tail"] < 1 else "")
                ax.annotate(short, (r["fewer_passes"], r["jaccard_mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        # the Pareto front: no other selector both cheaper and closer to exact
        front = sorted(res["rows"], key=lambda r: -r["fewer_passes"])  # exact BS closes it at (1, 1)
        best, line = -1.0, []
        for r in front:
            if r["jaccard_mean"] > best:
                best = r["jaccard_mean"]
                line.append(r)
        ax.plot([r["fewer_passes"] for r in line], [r["jaccard_mean"] for r in line], color="k", lw=0.8, ls="--", label="Pareto front")
        ctrl = res.get("control_float64")
        if ctrl:
            ax.axhline(ctrl["jaccard_mean"], color="tab:purple", lw=1.0, ls="-.",
                       label=f"exact BS, float64 vs float32 ({ctrl['images']} images): the noise floor")
        ax.axhline(MIN_JACCARD, color="g", lw=0.8, ls=":")
        ax.axvline(MIN_FEWER, color="g", lw=0.8, ls=":")
        ax.scatter([1], [1], marker="*", s=120, color="k", label="exact BS", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("forward passes: × fewer than exact BS (log)")
        ax.set_ylabel("mean Jaccard of the 5% subset vs exact BS")
        ax.set_title(f"{res['dataset']} {res['input']}, {res['n_fidelity']} test images (target: right of 10×, above 0.95)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--budget-min", type=float, default=75.0, help="wall-clock budget for the whole benchmark (minutes)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-fidelity", type=int, default=None, help="override: images every selector runs on")
    p.add_argument("--n-extra", type=int, default=None, help="override: more images for the accuracy pool")
    p.add_argument("--batch", type=int, default=8, help="images per selector call")
    p.add_argument("--chunk", type=int, default=None, help="candidates per forward pass (default: tuned once)")
    p.add_argument("--model-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=40, help="epochs of each subset model")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--control-images", type=int, default=8, help="images for the float64 exact-BS control (0: none)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's); on an oversubscribed host 1 can beat 2 (see BENCHMARKS.md)")
    p.add_argument("--train-reserve-min", type=float, default=8.0, help="budget kept for training the subset models")
    p.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py/ (skipped when absent)")
    p.add_argument("--cache", default=None, help="file to keep selections in (a rerun resumes from it)")
    p.add_argument("--plot", default=None)
    p.add_argument("--grid", choices=REMOVAL_SELECTORS, default="backselect",
                   help="backselect: the k x F grid of k-per-step BS (and BGSIS k=16); bgsis: the same grid for BGSIS")
    p.add_argument("--quick", action="store_true", help="12x12 images, 4 + 4 of them, 1 seed, 2 folds: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.n_fidelity, args.n_extra, args.seeds, args.folds, args.control_images = 12, 4, 4, 1, 2, 2
        args.model_epochs, args.epochs, args.batch, args.chunk = 2, 2, 8, 256
        args.threads = args.threads or 1
    with torch_threads(args.threads):
        return run(args)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    started = start()
    cache = Cache(args.cache)
    engine = EngineConfig()
    datasets = [("digits", lambda: load_digits(image_size=args.image_size))]
    if args.cifar_root:
        datasets.append(("cifar10", lambda: load_cifar10(args.cifar_root)))
    results = []
    for i, (name, load) in enumerate(datasets):
        try:
            data = load()
        except (DataError, OSError) as e:
            log(f"{name}: skipped ({str(e).splitlines()[0]})")
            continue
        budget = args.budget_min * 60 - (time.time() - started[0])
        results.append(run_dataset(name, data, args, engine, cache, budget / (len(datasets) - i)))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results}
    for res in results:
        print_table(res)
    finish(report, started, args.json_out)
    if args.plot and results:
        pareto_plot(results, args.plot)
    return report


if __name__ == "__main__":
    main()
