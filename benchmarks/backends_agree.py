"""Do the two backends print the same tables? One `overinterp run` in memory (`--no-stream`: Ray
Tune trials on arrays) and one streamed (`--stream`: Ray Data and Ray Train) on the same folder of
real photographs, with the same settings and seeds; each accuracy row is compared as mean ± std
over the seeds, and called within seed noise when the means differ by at most two standard errors
of their difference, 2·sqrt((s_a² + s_b²) / n).

The folder: the three photographs that ship with scikit-learn (`china.jpg`, `flower.jpg`) and
matplotlib (`grace_hopper.jpg`), each cut into three horizontal bands, one class per band (nine
classes). An image is a random square crop (half to all of the band's height) inside its band,
flipped left-right half the time, resized to --crop-px and saved as JPEG: real photographic texture
and colour with no download.

    python benchmarks/backends_agree.py --work /tmp/agree [--train-per-class 70 --val-per-class 30]

Two comparisons. "own": each backend trains its own full-image models and explains its own
seed-0 model, as a user's two runs would. "shared": both explain one model, the in-memory run's
seed-0 model (`--pretrained <model> --weights <its checkpoint>`), so that their selections can
agree exactly and only selection, subset training and evaluation are compared.

Every other setting is the run's own flags, after `--` (the default below is what BENCHMARKS.md
reports). A run whose `summary.json` exists in --work is reused, so a stopped comparison resumes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from _common import finish, machine, parser, start

# what BENCHMARKS.md reports: 12 px keeps exact backward selection's 1,260 images within ~25 min on 2 cores
RUN_ARGS = ["--image-size", "12", "--models", "resnet20", "--epochs", "10", "--selectors", "backselect,gradient",
            "--pixels-per-step", "8", "--exact-tail", "0.1"]
BACKENDS = ("no-stream", "stream")


def photographs() -> dict[str, str]:
    """name -> path of the photographs bundled with scikit-learn and matplotlib."""
    import matplotlib
    import sklearn.datasets

    bundled = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return {"china": os.path.join(bundled, "china.jpg"), "flower": os.path.join(bundled, "flower.jpg"),
            "hopper": os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")}


def write_photo_bands(root: str, train_per_class: int, val_per_class: int, crop_px: int = 32, seed: int = 0) -> list[str]:
    """Write root/{train,val}/<photo>_<band>/NNNN.jpg (see the module doc); returns the class names, sorted."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = []
    for name, path in photographs().items():
        photo = Image.open(path).convert("RGB")
        width, height = photo.size
        band = height // 3
        for b in range(3):
            cls = f"{name}_{b}"
            classes.append(cls)
            for split, n in (("train", train_per_class), ("val", val_per_class)):
                folder = os.path.join(root, split, cls)
                os.makedirs(folder, exist_ok=True)
                for i in range(n):
                    side = int(rng.integers(band // 2, band + 1))
                    x, y = int(rng.integers(0, width - side + 1)), b * band + int(rng.integers(0, band - side + 1))
                    crop = photo.crop((x, y, x + side, y + side)).resize((crop_px, crop_px), Image.BILINEAR)
                    if rng.random() < 0.5:
                        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                    crop.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    return sorted(classes)


def agreement(a: dict, b: dict) -> list[dict]:
    """Each accuracy row both summaries have ({model: {condition: [per seed, 0..1]}}), as percent:
    mean and std (ddof 1) per backend, the difference of the means, its noise bound
    2·sqrt((s_a² + s_b²) / n), and whether the difference is within it."""
    rows = []
    for model in sorted(set(a) & set(b)):
        for condition in sorted(set(a[model]) & set(b[model])):
            xa, xb = 100 * np.asarray(a[model][condition]), 100 * np.asarray(b[model][condition])
            n = min(len(xa), len(xb))
            sa, sb = (float(x.std(ddof=1)) if len(x) > 1 else 0.0 for x in (xa, xb))
            bound = 2 * math.sqrt((sa ** 2 + sb ** 2) / n)
            diff = float(xb.mean() - xa.mean())
            rows.append({"model": model, "condition": condition, "seeds": n, "a_mean": float(xa.mean()), "a_std": sa,
                         "b_mean": float(xb.mean()), "b_std": sb, "difference": diff, "noise_bound": bound,
                         "within_noise": abs(diff) <= bound})
    return rows


def run_backend(root: str, out: str, backend: str, run_args: list[str]) -> tuple[dict, float]:
    """(summary.json, wall seconds) of `overinterp run` on the folder with --<backend>; reused if there."""
    summary = os.path.join(out, "summary.json")
    if not os.path.exists(summary):
        t0 = time.time()
        # `-m overinterp.cli` exits with the run's status, so check=True stops at a failed run
        cmd = [sys.executable, "-m", "overinterp.cli", "run", "--dataset", "imagefolder", "--data-root", root, "--out", out,
               f"--{backend}", *run_args]
        print("$ overinterp " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, "wall_seconds"), "w") as f:
            f.write(f"{time.time() - t0:.0f}\n")
    with open(summary) as f, open(os.path.join(out, "wall_seconds")) as w:
        return json.load(f), float(w.read())


def table(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
    lines = ["| model | condition | in memory (%) | streamed (%) | difference | 2 s.e. | within seed noise |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['condition']} | {r['a_mean']:.1f} ± {r['a_std']:.1f} | {r['b_mean']:.1f} ± {r['b_std']:.1f} "
                     f"| {r['difference']:+.1f} | {r['noise_bound']:.1f} | {'yes' if r['within_noise'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--work", required=True, help="folder for the photographs and both runs' --out")
    p.add_argument("--train-per-class", type=int, default=70)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--crop-px", type=int, default=32, help="side of the JPEGs written (the run resizes to its --image-size)")
    p.add_argument("run_args", nargs="*", help="the run's flags, after --")
    args = p.parse_args(argv)
    run_args = args.run_args or RUN_ARGS
    started = start()
    root = os.path.join(args.work, "photos")
    if not os.path.isdir(root):
        write_photo_bands(root, args.train_per_class, args.val_per_class, args.crop_px)
    report = {"benchmark": "backends_agree", "machine": machine(packages=("torchvision", "ray")), "run_args": run_args,
              "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    model = run_args[run_args.index("--models") + 1].split(",")[0] if "--models" in run_args else None
    for name in ("own", "shared"):
        extra = []
        if name == "shared":
            if model is None:
                break  # the explained model's name is needed for --pretrained
            extra = ["--pretrained", model, "--weights", os.path.join(args.work, "own-no-stream", "trials", f"{model}-full-s0", "model.pt")]
        (a, wall_a), (b, wall_b) = (run_backend(root, os.path.join(args.work, f"{name}-{backend}"), backend, run_args + extra)
                                    for backend in BACKENDS)
        rows = agreement(a["accuracy"], b["accuracy"])
        within = sum(r["within_noise"] for r in rows)
        print(f"\n{name}: {within} of {len(rows)} rows within seed noise; wall {wall_a:.0f} s in memory, {wall_b:.0f} s streamed")
        print(table(rows))
        report[name] = {"rows": rows, "rows_within_noise": within, "wall_seconds": {"in_memory": wall_a, "streamed": wall_b},
                        "sis": {"in_memory": a.get("sis"), "streamed": b.get("sis")},
                        "variant_accuracy": {"in_memory": a.get("variant_accuracy"), "streamed": b.get("variant_accuracy")}}
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
