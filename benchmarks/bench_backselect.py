"""Backward selection: our engine against the paper's original strategy, in one run, one device.

For each model (the digits CNN at 8x8x1, ResNet20 at 32x32x3; untrained weights, seeded):
  exactness  full BS with both on the same images -> identical orders? max |curve difference|
             (ResNet20: full runs at 8x8x3, because one 32x32 baseline run takes ~10 min here;
             its 32x32 speed steps are compared too)
  speed      the same images and steps with both (ResNet20 32x32: the first --steps steps),
             interleaved --repeats times; medians, and the speed-up as the median per-run ratio
  peak       the plain forward throughput of the engine's own model object and settings
             (channels_last), max over batch sizes; efficiency = engine passes/s / peak.
             The eager fp32 NCHW forward throughput (the baseline's setting) is printed beside it.
Then, on a digits CNN trained for a few seconds, the approximations' fidelity on the 364 test
images (overlap of their 5% subsets with exact BS, and cost), and exact BS on all 1,797 images.
On CUDA, --autocast bf16 adds the engine under bf16 autocast and its agreement with fp32.

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/bench_backselect.py [--device cuda] [--repeats 3] [--steps 2] [--quick]
"""

from __future__ import annotations

import contextlib
import statistics

import numpy as np
import torch

from _common import describe, finish, machine, parser, start, timed  # first: it puts this checkout on sys.path
from overinterp.data import load_digits, normalize
from overinterp.models import create_model
from overinterp.selection import (
    EngineConfig,
    backward_selection,
    batched_gradient_sis,
    keep_mask,
)
from overinterp.selection.engine import compiled, exact_fp32, forward_rate, max_chunk, tune_chunk
from original import original_backward_selection
from overinterp.training import TrainConfig, train_model


def twin_models(name, channels, device, seed=0):
    """The engine's model and the baseline's: same weights, separate objects (the engine converts
    its own to channels_last; the baseline runs eager NCHW like the original code)."""
    torch.manual_seed(seed)
    engine_model = create_model(name, 10, channels).to(device).eval()
    base_model = create_model(name, 10, channels).to(device).eval()
    base_model.load_state_dict(engine_model.state_dict())
    return engine_model, base_model


def run_baseline(model, images, device, steps):
    """The original strategy, one image at a time: (orders, curves, forward passes, seconds)."""
    runs, seconds = timed(lambda: [original_backward_selection(model, img, device, max_steps=steps) for img in images.cpu().numpy()], device)
    orders, curves, passes = zip(*runs)
    return np.stack(orders), np.stack(curves), sum(passes), seconds


def run_engine(model, images, steps, config):
    return timed(lambda: backward_selection(model, images, config=config, max_steps=steps), images.device)


def agreement(base_order, base_curve, res, steps):
    n = steps or base_order.shape[1]
    eng_order = res.order[:, :n].cpu().numpy()
    eng_curve = res.curve[:, :n].cpu().numpy()
    return {
        "identical_orders": bool(np.array_equal(base_order[:, :n], eng_order)),
        "images_identical": int((base_order[:, :n] == eng_order).all(1).sum()),
        "images": int(len(eng_order)),
        "max_curve_diff": float(np.abs(base_curve[:, :n] - eng_curve).max()),
    }


def peak_rate(model, sample, channels_last, device, config=None):
    """Best plain forward throughput of the engine's model with the engine's settings."""
    limit = max_chunk(model, sample)
    sizes = [b for b in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b <= limit]
    forward = model
    if config is not None and config.compile:
        # each size compiles anew (~30 s on a CPU): measure around the engine's tuned chunk only
        chunk = tune_chunk(model, sample, limit, channels_last)
        sizes = [b for b in (chunk // 2, chunk, 2 * chunk) if 1 <= b <= limit]
        forward = compiled(model)
    rates = {b: forward_rate(forward, sample, b, channels_last, repeats=3) for b in sizes}
    best = max(rates, key=rates.get)
    return rates[best], best


def bench_model(name, channels, size, exact_size, n_images, n_exact, steps, repeats, device, config, images=None):
    engine_model, base_model = twin_models(name, channels, device)
    gen = torch.Generator().manual_seed(1)
    if images is None:
        images = torch.randn(n_images, channels, size, size, generator=gen)
    images = images.to(device)
    exact_images = torch.randn(n_exact, channels, exact_size, exact_size, generator=gen).to(device)

    # exactness on full runs
    b_order, b_curve, _, _ = run_baseline(base_model, exact_images, device, None)
    res, _ = run_engine(engine_model, exact_images, None, config)
    exact = agreement(b_order, b_curve, res, None)

    # speed: warm the engine (chunk autotune, channels_last conversion) outside the timing
    backward_selection(engine_model, images[:1], config=config, max_steps=1)
    base_rates, eng_rates, ratios, speed_agree = [], [], [], None
    for _ in range(repeats):
        b_order, b_curve, b_passes, b_time = run_baseline(base_model, images, device, steps)
        res, e_time = run_engine(engine_model, images, steps, config)
        base_rates.append(b_passes / b_time)
        eng_rates.append(res.forward_passes / e_time)
        ratios.append((res.forward_passes / e_time) / (b_passes / b_time))
        speed_agree = agreement(b_order, b_curve, res, steps)
    peak, peak_batch = peak_rate(engine_model, images, config.channels_last, device, config)
    eager, eager_batch = peak_rate(base_model, images, False, device)
    hw = size * size
    full_passes = hw * (hw + 1) // 2
    eng = statistics.median(eng_rates)
    return {
        "model": name,
        "compiled": config.compile,
        "input": f"{channels}x{size}x{size}",
        "speed_steps": steps or hw,
        "speed_images": int(len(images)),
        "exact_input": f"{channels}x{exact_size}x{exact_size}",
        "baseline_passes_per_s": statistics.median(base_rates),
        "engine_passes_per_s": eng,
        "baseline_images_per_s": statistics.median(base_rates) / full_passes,
        "engine_images_per_s": eng / full_passes,
        "speedup": statistics.median(ratios),
        "speedup_runs": ratios,
        "peak_forward_per_s": peak,
        "peak_batch": peak_batch,
        "eager_fp32_nchw_forward_per_s": eager,
        "eager_batch": eager_batch,
        "efficiency": eng / peak,
        "exactness_full_runs": exact,
        "agreement_speed_steps": speed_agree,
    }


def approximations(device, config, quick):
    """Fidelity of k pixels per step and BGSIS against exact BS, on a trained digits CNN."""
    d = load_digits()
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10, 1).to(device)
    xtr = torch.from_numpy(d.images["train"]).to(device)
    train_model(model, xtr, torch.from_numpy(d.labels["train"]).to(device), d.mean, d.std, TrainConfig(epochs=30, lr=0.05))
    model.eval()
    test = normalize(torch.from_numpy(d.images["test"]).to(device), d.mean, d.std)
    if quick:
        test = test[:64]
    rows = []
    exact, t_exact = timed(lambda: backward_selection(model, test, config=config), device)
    ref = keep_mask(exact.order, 0.05)
    n_keep = int(ref[0].sum())
    rows.append({"selector": "backselect k=1 (exact)", "seconds": t_exact, "passes": exact.forward_passes, "overlap_5pct": 1.0})
    variants = [("backselect", k) for k in (2, 4, 8)] + [("bgsis", k) for k in (1, 4)]
    for sel, k in variants:
        if sel == "backselect":
            res, dt = timed(lambda: backward_selection(model, test, pixels_per_step=k, keep_fraction=0.05, config=config), device)
        else:  # as a run selects: no step crosses the 5% subset's boundary
            res, dt = timed(lambda: batched_gradient_sis(model, test, pixels_per_step=k, keep_fraction=0.05), device)
        overlap = float((keep_mask(res.order, 0.05) & ref).sum(1).float().mean()) / n_keep
        rows.append({"selector": f"{sel} k={k}", "seconds": dt, "passes": res.forward_passes, "overlap_5pct": overlap})
    # exact BS on all 1,797 digits images (train + test) with the trained model
    all_imgs = normalize(torch.from_numpy(np.concatenate([d.images["train"], d.images["test"]])).to(device), d.mean, d.std)
    if quick:
        all_imgs = all_imgs[:128]
    res, dt = timed(lambda: backward_selection(model, all_imgs, config=config), device)
    return rows, {"images": int(len(all_imgs)), "seconds": dt, "passes": res.forward_passes}


def autocast_agreement(device, steps):
    """bf16 autocast vs fp32 on ResNet20 32x32 (CUDA only): speed and order agreement."""
    model, _ = twin_models("resnet20", 3, device)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    out = {}
    for name, cfg in (("fp32", EngineConfig()), ("bf16", EngineConfig(autocast="bf16"))):
        backward_selection(model, images[:1], config=cfg, max_steps=1)
        res, dt = run_engine(model, images, steps, cfg)
        out[name] = (res, res.forward_passes / dt)
    n = steps
    same = (out["fp32"][0].order[:, :n] == out["bf16"][0].order[:, :n]).float().mean().item()
    return {"fp32_passes_per_s": out["fp32"][1], "bf16_passes_per_s": out["bf16"][1], "speedup": out["bf16"][1] / out["fp32"][1],
            "same_pixel_at_step": same, "max_curve_diff": float((out["fp32"][0].curve[:, :n] - out["bf16"][0].curve[:, :n]).abs().max())}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="ResNet20 32x32: steps timed per image")
    p.add_argument("--resnet-images", type=int, default=2)
    p.add_argument("--digits-images", type=int, default=16)
    p.add_argument("--autocast", choices=("bf16",), default=None, help="CUDA: also run bf16 autocast")
    p.add_argument("--no-compile", action="store_true", help="skip the ResNet20 row with torch.compile (~1 min of compiling)")
    p.add_argument("--quick", action="store_true", help="smaller everything (a smoke test of this script)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = EngineConfig()
    if args.quick:
        args.repeats, args.steps, args.resnet_images, args.digits_images = 1, 1, 1, 4
    started = start()
    d = load_digits()
    digits_imgs = normalize(torch.from_numpy(d.images["test"][: args.digits_images]), d.mean, d.std)
    # the engine scores in strict fp32 (engine.exact_fp32: TF32 off on CUDA); the baseline and the
    # peak rates run in the same precision, so the speed-up compares like with like
    with exact_fp32() if device.type == "cuda" else contextlib.nullcontext():
        results = [
            bench_model("digits_cnn", 1, 8, 8, args.digits_images, 4, None, args.repeats, device, config, images=digits_imgs),
            bench_model("resnet20", 3, 32, 8, args.resnet_images, 2, args.steps, args.repeats, device, config),
        ]
        if not args.no_compile:
            results.append(bench_model("resnet20", 3, 32, 8, args.resnet_images, 2, args.steps, args.repeats, device,
                                       EngineConfig(compile=True)))
    approx, digits_all = approximations(device, config, args.quick)
    bf16 = autocast_agreement(device, args.steps) if (args.autocast and device.type == "cuda") else None
    report = {"machine": machine(device), "device": str(device), "repeats": args.repeats, "models": results,
              "approximations": approx, "digits_all": digits_all, "bf16": bf16}

    print(f"\nBackward selection on {device} ({describe(report['machine'])}); medians of {args.repeats} interleaved runs")
    print(f"{'model':<20}{'input':<10}{'timed':<16}{'baseline pass/s':>16}{'engine pass/s':>15}{'speed-up':>9}"
          f"{'peak fwd/s':>12}{'eager fwd/s':>12}{'effic.':>8}  exact (full runs)          speed-run agreement")
    for r in results:
        ex, sa = r["exactness_full_runs"], r["agreement_speed_steps"]
        timed = f"{r['speed_images']} img x {r['speed_steps']} st"
        label = r["model"] + (" +compile" if r["compiled"] else "")
        print(f"{label:<20}{r['input']:<10}{timed:<16}{r['baseline_passes_per_s']:>16,.0f}{r['engine_passes_per_s']:>15,.0f}"
              f"{r['speedup']:>8.2f}x{r['peak_forward_per_s']:>12,.0f}{r['eager_fp32_nchw_forward_per_s']:>12,.0f}{r['efficiency']:>8.2f}  "
              f"{ex['images_identical']}/{ex['images']} at {r['exact_input']} (curve ±{ex['max_curve_diff']:.1e})  "
              f"{sa['images_identical']}/{sa['images']} (±{sa['max_curve_diff']:.1e})")
        print(f"{'':<30}full-image BS rate: baseline {r['baseline_images_per_s']:.3g} img/s, engine {r['engine_images_per_s']:.3g} img/s; "
              f"ceiling of the speed-up (peak / baseline) {r['peak_forward_per_s'] / r['baseline_passes_per_s']:.2f}x")
    print("\nApproximations on a trained digits CNN (test images): overlap of the 5% subset with exact BS")
    print(f"{'selector':<26}{'seconds':>9}{'forward passes':>16}{'overlap':>9}")
    for a in approx:
        print(f"{a['selector']:<26}{a['seconds']:>9.2f}{a['passes']:>16,}{a['overlap_5pct']:>9.3f}")
    print(f"\nExact BS on {digits_all['images']} digits images: {digits_all['seconds']:.1f} s")
    if bf16:
        print(f"bf16 autocast: {bf16['speedup']:.2f}x fp32; same pixel chosen at {100 * bf16['same_pixel_at_step']:.1f}% of steps; curve ±{bf16['max_curve_diff']:.1e}")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
