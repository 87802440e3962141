"""Batched Gradient SIS cost at ImageNet size: seconds per image and device-hours per 10,000 images.

Times the first --steps steps (one forward + backward each, batch --batch) of a torchvision model
(untrained; the cost does not depend on the weights) and extrapolates to the full ceil(HW / k)
steps. Prints a one-line summary and a BENCH_JSON line.

Usage: python benchmarks/bench_bgsis.py [--model resnet50] [--size 224] [--k 100] [--batch 8] [--device cuda] [--json-out FILE]
"""

from __future__ import annotations

import math
import statistics

import torch

from _common import describe, finish, machine, parser, start, timed  # first: it puts this checkout on sys.path
from overinterp.models import create_model
from overinterp.selection import batched_gradient_sis


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    started = start()
    torch.manual_seed(0)
    model = create_model(f"tv:{args.model}", 1000).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    batched_gradient_sis(model, x[:1], pixels_per_step=args.k, max_steps=1)  # warm-up
    times = [timed(lambda: batched_gradient_sis(model, x, pixels_per_step=args.k, max_steps=args.steps), device)[1] for _ in range(args.repeats)]
    per_step_image = statistics.median(times) / (args.steps * args.batch)  # s per image per step
    steps = math.ceil(args.size * args.size / args.k)
    per_image = per_step_image * steps
    report = {"machine": machine(device), "device": str(device), "model": args.model, "size": args.size, "k": args.k, "batch": args.batch,
              "timed_steps": args.steps, "repeats": args.repeats, "full_steps": steps, "seconds_per_image": per_image,
              "hours_per_10k_images": per_image * 10_000 / 3600}
    print(f"BGSIS {args.model} {args.size}px k={args.k} batch {args.batch} on {device} ({describe(report['machine'])}): {per_image:.1f} s per image "
          f"({steps} steps), {report['hours_per_10k_images']:.1f} device-hours per 10,000 images (median of {args.repeats})")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
