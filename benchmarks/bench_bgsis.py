"""Batched Gradient SIS cost at ImageNet size: seconds per image and device-hours per 10,000 images.

Times the first --steps steps (one forward + backward each, batch --batch) of a torchvision model
(untrained; the cost does not depend on the weights) and extrapolates to the full ceil(HW / k)
steps. Prints a table and a BENCH_JSON line.

Usage: python benchmarks/bench_bgsis.py [--model resnet50] [--size 224] [--k 100] [--batch 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overinterp.models import create_model  # noqa: E402
from overinterp.selection import batched_gradient_sis  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(f"tv:{args.model}", 1000).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    batched_gradient_sis(model, x[:1], pixels_per_step=args.k, max_steps=1)  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batched_gradient_sis(model, x, pixels_per_step=args.k, max_steps=args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_step_image = statistics.median(times) / (args.steps * args.batch)  # s per image per step
    steps = math.ceil(args.size * args.size / args.k)
    per_image = per_step_image * steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {"model": args.model, "size": args.size, "k": args.k, "batch": args.batch, "device": name, "torch": torch.__version__,
              "timed_steps": args.steps, "repeats": args.repeats, "full_steps": steps, "seconds_per_image": per_image,
              "hours_per_10k_images": per_image * 10_000 / 3600}
    print(f"BGSIS {args.model} {args.size}px k={args.k} batch {args.batch} on {name}: {per_image:.1f} s per image "
          f"({steps} steps), {report['hours_per_10k_images']:.1f} device-hours per 10,000 images (median of {args.repeats})")
    print("BENCH_JSON " + json.dumps(report))
    return report


if __name__ == "__main__":
    main()
