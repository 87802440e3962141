"""ROAD fill: our batched CG (`overinterp.fill`) against Quantus 0.6.0's `noisy_linear_imputation`.

The same masked images go to both in one run: RGB images (N(0, 1), i.e. normalised units) at 32²
and 224², with 50% and 90% of pixels removed, by two kinds of mask:
  random  uniformly random pixels (the benign case: every removed pixel is near a kept one);
  blobs   the pixels with the largest values of a blurred random field, so removed pixels form
          large connected regions, as when an attribution map's most important pixels are removed.
The reference runs one image at a time (one sparse system with 3 right-hand sides, one per channel,
the way it works); ours runs the whole batch at once. Timed --repeats times, interleaved
(reference, ours, reference, ours, ...), both with noise σ = 0.01 on; medians, and the speed-up as
the median of the per-run ratios. Agreement: max and mean |difference| over removed pixels with the
noise off in both (normalised units), and the CG iterations ours needed.

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/bench_road.py [--device cpu] [--repeats 3] [--json-out FILE] [--quick]
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
import torch.nn.functional as F

from _common import describe, finish, machine, parser, start, timed, torch_threads  # first: it puts this checkout on sys.path
from overinterp.fill import fill, solve_road


def make_masks(kind: str, n: int, size: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    """(n, size*size) bool keep masks with round(frac * HW) pixels removed per image."""
    hw = size * size
    score = torch.rand(n, 1, size, size, generator=gen)
    if kind == "blobs":  # blur the field (box filter of width size/8, 3 times): smooth, blob-shaped ranks
        k = max(3, size // 8) | 1
        for _ in range(3):
            score = F.avg_pool2d(score, k, 1, k // 2, count_include_pad=False)
    order = score.view(n, hw).argsort(1, descending=True)  # first = removed first
    keep = torch.ones(n, hw, dtype=torch.bool)
    keep.scatter_(1, order[:, : round(frac * hw)], False)
    return keep


def run_reference(x: np.ndarray, keep: np.ndarray, noise: float):
    """Quantus, one image at a time: x (N, C, H, W) float32, keep (N, HW) bool."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    out, seconds = timed(lambda: [noisy_linear_imputation(arr=img, indices=np.flatnonzero(~k), noise=noise) for img, k in zip(x, keep)],
                         torch.device("cpu"))
    return np.stack(out), seconds


def run_ours(x: torch.Tensor, keep: torch.Tensor, noise: float, gen: torch.Generator):
    return timed(lambda: fill(x, keep, "road", noise_std=noise, generator=gen), x.device)


def bench_case(size, frac, kind, n, repeats, device):
    gen = torch.Generator().manual_seed(size * 1000 + int(frac * 100) + (kind == "blobs"))
    x = torch.randn(n, 3, size, size, generator=gen)
    keep = make_masks(kind, n, size, frac, gen)
    x_np, keep_np = x.numpy(), keep.numpy()
    xd, keepd = x.to(device), keep.to(device)
    noise_gen = torch.Generator(device=device).manual_seed(0)
    run_ours(xd[:1], keepd[:1], 0.01, noise_gen)  # warm-up (allocator, kernels)

    ref_rates, our_rates, ratios = [], [], []
    for _ in range(repeats):
        _, t_ref = run_reference(x_np, keep_np, 0.01)
        _, t_ours = run_ours(xd, keepd, 0.01, noise_gen)
        ref_rates.append(n / t_ref)
        our_rates.append(n / t_ours)
        ratios.append(t_ref / t_ours)

    ref, _ = run_reference(x_np, keep_np, 0.0)  # noise off in both: the linear parts must agree
    ours, iterations = solve_road(xd, keepd)
    ours = torch.where(keepd.view(n, 1, size, size), xd, ours).cpu().numpy()
    removed = ~keep.view(n, 1, size, size).expand_as(x).numpy()
    diff = np.abs(ours - ref)[removed]
    noisy, _ = run_ours(xd, keepd, 0.01, noise_gen)
    kept_equal = bool(np.array_equal(noisy.cpu().numpy()[~removed], x_np[~removed]))
    return {
        "size": size, "removed": frac, "mask": kind, "images": n,
        "reference_images_per_s": statistics.median(ref_rates), "ours_images_per_s": statistics.median(our_rates),
        "reference_ms_per_image": 1e3 / statistics.median(ref_rates), "ours_ms_per_image": 1e3 / statistics.median(our_rates),
        "speedup": statistics.median(ratios), "speedup_runs": ratios, "cg_iterations": iterations,
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "kept_pixels_identical": kept_equal,
    }


def quantus_road_rgb_note() -> str:
    """Quantus's ROAD metric on an RGB batch: it broadcasts the (N, 1, H, W) attribution to all channels,
    ranks C*H*W entries, and hands those channel-flattened indices to the per-pixel imputer."""
    import quantus

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    a = np.random.default_rng(1).random((2, 1, 8, 8)).astype(np.float32)
    try:
        quantus.ROAD(percentages=[50], disable_warnings=True)(model=model, x_batch=x, y_batch=np.array([0, 1]), a_batch=a, device="cpu")
    except Exception as e:  # noqa: BLE001 - the point is to report what it raises
        return f"quantus.ROAD on RGB (2, 3, 8, 8) images raises {type(e).__name__}: {e}"
    return "quantus.ROAD on RGB (2, 3, 8, 8) images ran without error"


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (Quantus's sparse solve uses one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images-32", type=int, default=64, help="images per case at 32x32")
    p.add_argument("--images-224", type=int, default=2, help="images per case at 224x224")
    p.add_argument("--masks", nargs="+", default=["random", "blobs"], choices=["random", "blobs"])
    p.add_argument("--quick", action="store_true", help="16x16 only, 8 images, 1 repeat (a smoke test of this script)")
    args = p.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args):
    device = torch.device(args.device)
    started = start()
    sizes = [(16, 8)] if args.quick else [(32, args.images_32), (224, args.images_224)]
    repeats = 1 if args.quick else args.repeats
    cases = [bench_case(s, frac, kind, n, repeats, device) for s, n in sizes for kind in args.masks for frac in (0.5, 0.9)]
    note = quantus_road_rgb_note()
    report = {"machine": machine(device, ("quantus",)), "device": str(device), "repeats": repeats, "cases": cases, "note": note}

    print(f"\nROAD fill on {device} ({describe(report['machine'])}); RGB images; medians of {repeats} interleaved runs")
    print(f"{'size':>5}{'mask':>8}{'removed':>9}{'images':>8}{'Quantus img/s':>15}{'ours img/s':>12}{'speed-up':>10}"
          f"{'CG iters':>10}{'max |diff|':>12}{'mean |diff|':>13}")
    for c in cases:
        print(f"{c['size']:>5}{c['mask']:>8}{c['removed']:>9.0%}{c['images']:>8}{c['reference_images_per_s']:>15,.1f}"
              f"{c['ours_images_per_s']:>12,.1f}{c['speedup']:>9.1f}x{c['cg_iterations']:>10}{c['max_abs_diff']:>12.1e}"
              f"{c['mean_abs_diff']:>13.1e}")
    print(f"Note: {note}")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
