"""Driver memory of the ImageNet job vs data set size: peak RSS of `jobs/sis_imagenet.py` on a
synthetic ImageFolder of N and of 8·N images per split.

The job's claim (overinterp/pipeline/stream.py): the driver never holds the images — selection
streams them through Ray Data actors, training joins encoded images with keep-masks on the Ray
Data workers, evaluation streams them again. If that holds, the driver's peak RSS is the same at N
and 8·N up to what genuinely scales with N on the driver (file listings, image ids, one row per
Parquet shard), which is bytes per image, not pixels.

The two data sets are written once (real files in class folders, `overinterp.synthetic.
write_imagefolder`: JPEG, every third a PNG) and reused; every run gets a fresh --out. The files
are 256 px (~90 KB each) while the job crops to 32 px: the compute stays tiny, but the bytes
streamed grow by ~160 MB from N=128 to 8N, so a driver that held the encoded images would show it
(at 40-px files, ~3 KB each, it would hide in the run-to-run noise). The job runs as a subprocess —
the driver — with identical small settings at both sizes (tv:resnet18 from a local state_dict,
BGSIS k=128, one seed, one epoch) and starts its own local Ray.
Every ~0.2 s we read /proc/<pid>/status of the driver process only: VmRSS (resident now), RssAnon
(its private heap; VmRSS also counts mapped files and shared memory, e.g. object-store pages it
reads) and VmHWM (the kernel's own peak RSS, readable only while the process lives, so we keep the
last value read). Ray's GCS, raylet and workers are separate processes and are *not* counted.
Runs are interleaved (N, 8N, N, 8N, ...); medians per size, and the ratio 8N/N as the median of
the per-run ratios.

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/driver_rss.py [--n 128] [--repeats 2] [--json-out FILE] [--quick]
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from _common import ROOT, describe, finish, machine, parser, start  # first: it puts this checkout on sys.path
from overinterp.models import create_model
from overinterp.synthetic import write_imagefolder

NUM_CLASSES = 4
STAGE = re.compile(r"\] (stage \d+/\d+): ")  # the driver's "[overinterp hh:mm:ss] stage 2/3: ..." lines


def make_data(root: str, n: int, size: int) -> tuple[str, str, int]:
    """An ImageFolder of n images per split (train and val), NUM_CLASSES classes; returns (train, val, bytes of all files)."""
    if n % NUM_CLASSES:
        raise SystemExit(f"driver_rss.py: error: --n must be a multiple of {NUM_CLASSES}, got {n}")
    write_imagefolder(root, n_per_class=n // NUM_CLASSES, num_classes=NUM_CLASSES, size=size, seed=0)
    size_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
    return os.path.join(root, "train"), os.path.join(root, "val"), size_bytes


def make_weights(path: str, model: str) -> str:
    torch.manual_seed(0)
    torch.save(create_model(model, num_classes=NUM_CLASSES).state_dict(), path)
    return path


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of a live process in KiB; {} once it has exited (a zombie has none)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_driver(argv: list[str], log_path: str, interval: float) -> dict:
    """Run the job as a subprocess and poll its memory until it exits; peaks in MiB."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always its own local Ray
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0}
    by_stage: dict[str, int] = {}  # stage -> peak VmRSS (KiB) while it was the latest stage logged
    stage, seen, samples = "start-up", 0, 0
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "sis_imagenet.py"), *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            done = proc.poll() is not None
            status = read_status(proc.pid)
            if status:
                samples += 1
                for k, v in status.items():
                    peak[k] = max(peak[k], v)
                with open(log_path, "rb") as f:  # which stage are we in? whole new lines only
                    f.seek(seen)
                    text = f.read()
                text = text[: text.rfind(b"\n") + 1]
                seen += len(text)
                for m in STAGE.finditer(text.decode(errors="replace")):
                    stage = m.group(1)
                by_stage[stage] = max(by_stage.get(stage, 0), status.get("VmRSS", 0))
            if done:
                break
            time.sleep(interval)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"sis_imagenet.py exited with {proc.returncode}; log {log_path} ends:\n{tail}")
    mib = 1 / 1024
    return {"peak_rss_mib": max(peak["VmRSS"], peak["VmHWM"]) * mib, "peak_vmrss_sampled_mib": peak["VmRSS"] * mib,
            "vmhwm_mib": peak["VmHWM"] * mib, "peak_rss_anon_mib": peak["RssAnon"] * mib,
            "peak_rss_by_stage_mib": {k: v * mib for k, v in by_stage.items()}, "samples": samples, "seconds": seconds}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=128, help="images per split of the small data set; the large one has 8x")
    p.add_argument("--factor", type=int, default=8, help="size of the large data set, in multiples of --n")
    p.add_argument("--repeats", type=int, default=2, help="runs per size, interleaved")
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--image-size", type=int, default=32, help="the job's crop side: what the models see")
    p.add_argument("--file-size", type=int, default=256,
                   help="side of the image files (~90 KB each at 256: JPEG ~50 KB, PNG ~170 KB); the job resizes them to --image-size")
    p.add_argument("--pixels-per-step", type=int, default=128, help="BGSIS k: the job's cheapest selection is a large k")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--select-batch", type=int, default=32)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples of /proc/<pid>/status")
    p.add_argument("--scratch", default=None, help="folder for data and outputs (default: a temporary one, removed at the end)")
    p.add_argument("--quick", action="store_true", help="N=16 vs 32, one run each (a smoke test of this script)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.factor, args.repeats, args.batch_size, args.select_batch = 16, 2, 1, 8, 8
    sizes = [args.n, args.factor * args.n]

    started = start()
    scratch = args.scratch or tempfile.mkdtemp(prefix="driver_rss-")
    os.makedirs(scratch, exist_ok=True)
    try:
        weights = make_weights(os.path.join(scratch, "weights.pt"), args.model)
        data = {n: make_data(os.path.join(scratch, f"data-{n}"), n, args.file_size) for n in sizes}
        common = ["--model", args.model, "--weights", weights, "--num-classes", str(NUM_CLASSES), "--image-size", str(args.image_size),
                  "--pixels-per-step", str(args.pixels_per_step), "--seeds", "0", "--epochs", "1", "--batch-size", str(args.batch_size),
                  "--select-batch", str(args.select_batch)]
        runs = []
        for r in range(args.repeats):
            for n in sizes:
                out = os.path.join(scratch, f"out-{n}-run{r + 1}")
                train, val, _ = data[n]
                res = run_driver(["--train", train, "--val", val, *common, "--out", out], out + ".log", args.interval)
                runs.append({"run": r + 1, "images_per_split": n, **res})
                print(f"run {r + 1}, N={n}: peak driver RSS {res['peak_rss_mib']:.0f} MiB in {res['seconds']:.0f} s", flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)

    def median(n, key):
        return statistics.median(x[key] for x in runs if x["images_per_split"] == n)

    ratios = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in zip(runs[0::2], runs[1::2])]
    summary = {str(n): {k: median(n, k) for k in ("peak_rss_mib", "peak_rss_anon_mib", "seconds")} for n in sizes}
    report = {
        "benchmark": "driver_rss", "machine": machine(packages=("torchvision", "ray", "mlflow", "pyarrow")),
        "measured": "the driver process only (jobs/sis_imagenet.py); Ray workers are separate processes",
        "settings": {"images_per_split": sizes, "classes": NUM_CLASSES, "model": args.model, "image_size": args.image_size,
                     "file_size": args.file_size, "data_mib": [data[n][2] / 2**20 for n in sizes],
                     "pixels_per_step": args.pixels_per_step, "batch_size": args.batch_size, "select_batch": args.select_batch,
                     "epochs": 1, "seeds": [0], "interval_s": args.interval, "repeats": args.repeats, "quick": args.quick},
        "runs": runs, "median": summary, "ratio_runs": ratios, "ratio": statistics.median(ratios),
    }

    print(f"\nPeak RSS of the jobs/sis_imagenet.py driver process (Ray workers not counted); {describe(report['machine'])}; "
          f"medians of {args.repeats} interleaved runs")
    print(f"{'images/split':>13}{'files MiB':>11}{'peak RSS MiB':>14}{'RssAnon MiB':>13}{'wall s':>9}")
    for n in sizes:
        s = summary[str(n)]
        print(f"{n:>13}{data[n][2] / 2**20:>11.1f}{s['peak_rss_mib']:>14.0f}{s['peak_rss_anon_mib']:>13.0f}{s['seconds']:>9.0f}")
    print(f"ratio {sizes[1]}/{sizes[0]} images: peak RSS x{report['ratio']:.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)})")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
