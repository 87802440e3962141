"""Cost per image of the ranking selectors (meaningful perturbation, gradient, integrated gradients,
occlusion) beside exact backward selection and Batched Gradient SIS, in one run on one device.

Models (untrained, seeded; the cost does not depend on the weights): the digits CNN on 16 digits
test images (1x8x8) and ResNet20 on 2 random images (3x32x32). Every ranking selector is timed as
a whole (its ranking plus the p(c) curve of HW forward passes per image); the curve alone is timed
too, so the ranking's own cost is total − curve. Selectors are interleaved within each repeat;
medians of --repeats. On ResNet20, exact BS is timed over its first --bs-steps steps and BGSIS
(k = 1) over its first --bgsis-steps steps and both are extrapolated to the whole image by their
number of forward passes / steps (marked "extrapolated"); everything else runs to the end.

On a CPU shared with other jobs, run --threads 1: two OpenMP threads on two busy cores wait on
each other at every barrier (measured 35x slower than one thread here, 2026-11-23).

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/bench_selectors.py [--threads 2] [--repeats 3] [--device cpu] [--json-out FILE] [--quick]
"""

from __future__ import annotations

import statistics
import sys

import torch

from _common import describe, finish, machine, parser, start, timed, torch_threads  # first: it puts this checkout on sys.path
from overinterp.data import load_digits, normalize
from overinterp.models import create_model
from overinterp.selection import backward_selection, batched_gradient_sis
from overinterp.selection.attribution import attribution_selection
from overinterp.selection.perturbation import PerturbationParams, meaningful_perturbation
from overinterp.selection.ranking import ranking_curve


def selectors(quick: bool, bs_steps, bgsis_steps):
    """name -> (run(model, images), kind); kind 'ranking' also times the curve alone."""
    pert = PerturbationParams(iterations=10) if quick else PerturbationParams()
    ig = {"n_steps": 5} if quick else None
    return {
        f"perturbation (it{pert.iterations})": (lambda m, x: meaningful_perturbation(m, x, params=pert), "ranking"),
        "gradient": (lambda m, x: attribution_selection(m, x, "gradient"), "ranking"),
        f"ig (n{(ig or {}).get('n_steps', 50)})": (lambda m, x: attribution_selection(m, x, "ig", params=ig), "ranking"),
        "occlusion (window 1)": (lambda m, x: attribution_selection(m, x, "occlusion"), "ranking"),
        "backselect (exact)": (lambda m, x: backward_selection(m, x, max_steps=bs_steps), "bs"),
        "bgsis k=1": (lambda m, x: batched_gradient_sis(m, x, pixels_per_step=1, max_steps=bgsis_steps), "bgsis"),
    }


def bench_model(name, images, repeats, device, quick, bs_steps=None, bgsis_steps=None):
    torch.manual_seed(0)
    model = create_model(name, 10, images.shape[1]).to(device).eval()
    images = images.to(device)
    B, C, H, W = images.shape
    HW = H * W
    runs = selectors(quick, bs_steps, bgsis_steps)
    for run, _ in runs.values():  # warm-up: chunk tuning, Captum import, first-call allocations
        run(model, images[:1])
    ranking_curve(model, images[:1], torch.arange(HW)[None], torch.zeros(1, dtype=torch.long))
    times = {k: [] for k in runs}
    curve_times = {k: [] for k, (_, kind) in runs.items() if kind == "ranking"}
    passes = {}
    for _ in range(repeats):  # interleaved: every selector once per repeat
        for key, (run, kind) in runs.items():
            res, dt = timed(lambda: run(model, images), device)
            print(f"[{name}] {key}: {dt:.2f} s for {B} images", file=sys.stderr, flush=True)
            times[key].append(dt)
            passes[key] = res.forward_passes
            if kind == "ranking":
                curve_times[key].append(timed(lambda: ranking_curve(model, images, res.order, res.pred), device)[1])
    full = {}  # per repeat: seconds per whole image (BS and BGSIS on ResNet20 extrapolated)
    for key, (_, kind) in runs.items():
        scale = 1.0
        if kind == "bs" and bs_steps is not None:  # by forward passes: HW(HW+1)/2 per image
            scale = HW * (HW + 1) // 2 / (passes[key] / B)
        elif kind == "bgsis" and bgsis_steps is not None:  # by steps: HW steps of one pixel
            scale = HW / bgsis_steps
        full[key] = [t / B * scale for t in times[key]]
    bs_key = next(k for k, (_, kind) in runs.items() if kind == "bs")
    rows = []
    for key, (_, kind) in runs.items():
        row = {"selector": key, "model": name, "input": f"{C}x{H}x{W}", "images": B, "passes_per_image": passes[key] / B,
               "seconds_per_image": statistics.median(full[key]), "runs_seconds_per_image": full[key],
               # how many times cheaper than exact BS: the median of the per-repeat ratios (same load)
               "bs_cost_ratio": statistics.median(b / t for b, t in zip(full[bs_key], full[key])),
               "extrapolated": False, "timed": "whole image"}
        if kind == "ranking":
            row["curve_seconds_per_image"] = statistics.median(curve_times[key]) / B
            # the ranking's own share: total minus the curve timed right after it, per repeat
            row["ranking_seconds_per_image"] = statistics.median((t - c) / B for t, c in zip(times[key], curve_times[key]))
        elif kind == "bs" and bs_steps is not None:
            row.update(passes_per_image=HW * (HW + 1) // 2, extrapolated=True, timed=f"first {bs_steps} steps")
        elif kind == "bgsis" and bgsis_steps is not None:
            row.update(passes_per_image=HW + 2, extrapolated=True, timed=f"first {bgsis_steps} steps")
        rows.append(row)
    return rows


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--digits-images", type=int, default=16)
    p.add_argument("--resnet-images", type=int, default=2)
    p.add_argument("--bs-steps", type=int, default=2, help="ResNet20: exact BS steps timed, then extrapolated")
    p.add_argument("--bgsis-steps", type=int, default=64, help="ResNet20: BGSIS steps timed, then extrapolated")
    p.add_argument("--quick", action="store_true", help="digits only, 2 images, 1 repeat, short optimisations (a smoke test)")
    args = p.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args):
    device = torch.device(args.device)
    if args.quick:
        args.repeats, args.digits_images = 1, 2
    started = start()
    d = load_digits()
    digits = normalize(torch.from_numpy(d.images["test"][: args.digits_images]), d.mean, d.std)
    rows = bench_model("digits_cnn", digits, args.repeats, device, args.quick)
    if not args.quick:
        resnet_images = torch.randn(args.resnet_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        rows += bench_model("resnet20", resnet_images, args.repeats, device, False, args.bs_steps, args.bgsis_steps)
    report = {"machine": machine(device, ("captum",)), "device": str(device), "repeats": args.repeats, "rows": rows}
    print(f"\nSelector cost per image on {device} ({describe(report['machine'])}); "
          f"medians of {args.repeats} interleaved runs; BS cost / this = median of per-run ratios")
    print(f"{'model':<12}{'input':<8}{'selector':<22}{'fwd passes/img':>15}{'s/img':>10}{'curve s/img':>13}"
          f"{'ranking s/img':>15}{'BS cost / this':>16}  timed")
    for r in rows:
        curve = f"{r['curve_seconds_per_image']:.3g}" if "curve_seconds_per_image" in r else "-"
        rank = f"{r['ranking_seconds_per_image']:.3g}" if "ranking_seconds_per_image" in r else "-"
        timed_note = r["timed"] + (" (extrapolated)" if r["extrapolated"] else "")
        print(f"{r['model']:<12}{r['input']:<8}{r['selector']:<22}{r['passes_per_image']:>15,.0f}{r['seconds_per_image']:>10.3g}"
              f"{curve:>13}{rank:>15}{r['bs_cost_ratio']:>15.1f}x  {r['images']} img, {timed_note}")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
