"""The streamed run at ImageNet's count on one machine: wall time and images/s per stage, peak driver
memory and the store's size, at N images per split up to the whole 1,281,167 + 50,000.

The run is `jobs/sis_imagenet.py` on ImageNet-shaped Parquet (`python -m overinterp.synthetic
imagenet-shaped DIR`: 1,000 classes of tiny PNGs, as ImageNet's packed form), with settings that
keep the model's cost small so that the pipeline's own costs show: a registered small model
(digits_cnn, random weights written to a state_dict file) explained with BGSIS at k = 32 (2 gradient
steps cover an 8×8 image), subset models digits_cnn, one epoch, one seed. N is `--max-images`
(per split: the first N train and the first min(N, 50,000) val images); N = full runs the whole source.

The job runs as a subprocess (the driver, with its own local Ray). Every ~0.2 s the benchmark reads
/proc/<pid>/status of the driver process only: VmRSS, RssAnon (its private heap) and VmHWM (the
kernel's peak RSS). Ray's GCS, raylet and workers are separate processes and are not counted. Stage
times come from the driver's `stage k/3` lines, read as they are written; each sample also counts
toward the peak of the stage in progress (start-up, then 1, 2, 3), which says where growth with N
happens. Per stage, images/s is:
selection (train + val images) / stage 1; training images (trials × epochs × train images) / stage 2;
val images / stage 3.

Every ~1 s it also reads the CPU time of the driver and every process below it (the local Ray's
GCS, raylet and workers), grouped by what each runs (Ray's process titles: ray::ImplicitFunc
(a Tune trial), ray::FooterReader, ...): where a small run's CPU goes, which on 2 cores is where its time goes.

The claim it exists for: the driver holds no per-image state, so its peak RSS grows by at most
bytes per image (ids as int64 arrays, one row per store shard), not by Python objects per image.

Prints a human table and one machine-readable line starting with BENCH_JSON.
Usage: python benchmarks/driver_rss.py --source DIR [--n 10000,100000,full] [--json-out FILE]
       python benchmarks/driver_rss.py --quick       # writes a 2,000-image source; N = 100 and 1,000
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from _common import ROOT, describe, finish, machine, parser, start  # first: it puts this checkout on sys.path
from overinterp.config import streamed_select_batch
from overinterp.models import create_model
from overinterp.synthetic import write_imagenet_shaped

FULL = "full"
STAGE_START = re.compile(r"\] stage (\d+)/(\d+): ")  # "[overinterp hh:mm:ss] stage 2/3: training ..."
STAGE_DONE = re.compile(r"\] stage (\d+)/\d+ done in (\d+) s")
PLAN = re.compile(r"\] plan: .*?(\d+) train \+ (\d+) test images")
PLANNED = re.compile(r"\] done in \d+ s \(planned ([^)]*)\)")
CPU_EVERY = 5  # read every process's CPU time every this many samples (a walk of /proc)
TRIALS = re.compile(r"training \(subsets\): (\d+) / (\d+) trials in")


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


def process_cpu(root: int) -> dict[tuple[int, int], tuple[str | None, float]]:
    """{(pid, start time): (group, CPU seconds)} of `root` and every process below it (the local Ray's
    GCS, raylet and workers are the driver's descendants). A Ray worker is grouped by its title
    (ray::IDLE, ray::ImplicitFunc, ...: what it runs now), other processes by their program, an exiting
    process by None (it has no title left)."""
    hz = os.sysconf("SC_CLK_TCK")
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rpartition(")")[2]  # after the title, which may hold spaces and ")"
            fields = rest.split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue  # exited between the listing and the read
        stats[int(pid)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / hz, [c for c in cmd if c])
    out = {}
    for pid, (ppid, started, cpu, cmd) in stats.items():
        p = pid
        while p not in (root, 0, 1) and p in stats:
            p = stats[p][0]
        if p != root:
            continue
        title = cmd[0].decode(errors="replace") if cmd else ""
        if pid == root:
            group = "driver"
        elif not cmd:
            group = None  # exiting: its cmdline is gone, and its comm is the title cut to 15 bytes ("ray::ImplicitFu")
        elif title.startswith("ray::"):
            group = title.split()[0].split(".")[0]
        else:
            script = next((c.decode(errors="replace") for c in cmd[1:] if c.endswith(b".py")), title)
            group = os.path.basename(script.split()[0])
        out[(pid, started)] = (group, cpu)
    return out


def telling_group(seen: str | None, now: str | None) -> str:
    """The group to keep for a process seen as `seen` before and as `now` in this sample. A Ray worker's
    title changes with what it runs and is ray::IDLE between tasks, and an exiting process has none
    left: keep the most telling one seen."""
    if now is None:
        return seen or "exiting"
    if now == "ray::IDLE" and seen is not None and seen.startswith("ray::"):
        return seen
    return now


def cpu_by_group(samples: dict[tuple[int, int], tuple[str, float]]) -> dict[str, dict]:
    """{group: {"cpu_s", "processes"}}, most CPU first, from each process's last sample."""
    groups: dict[str, dict] = {}
    for group, cpu in samples.values():
        g = groups.setdefault(group, {"cpu_s": 0.0, "processes": 0})
        g["cpu_s"] += cpu
        g["processes"] += 1
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]["cpu_s"]))


def run_driver(argv: list[str], log_path: str, interval: float) -> dict:
    """Run the job as a subprocess and poll its memory and stage lines until it exits.

    Returns peaks in MiB (the whole run's, and each stage's: "start" until the first stage line,
    then "1", "2", "3" from each stage's start line), wall seconds, the start-up (process start to
    the first stage line), the CPU seconds of the driver and every process below it by group (read
    every CPU_EVERY samples: a process that lives less than that may be missed) and the log text."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always its own local Ray
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0}
    stage_peaks: dict[str, dict[str, int]] = {}
    stage, first_stage_s, seen, polls = "start", None, 0, 0
    cpu: dict[tuple[int, int], tuple[str, float]] = {}  # {(pid, start time): (group, CPU seconds)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "sis_imagenet.py"), *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            done = proc.poll() is not None
            with open(log_path, "rb") as f:
                f.seek(seen)
                text = f.read()
            text = text[: text.rfind(b"\n") + 1]  # whole lines only
            seen += len(text)
            starts = STAGE_START.findall(text.decode(errors="replace"))
            if starts:
                stage = starts[-1][0]
                if first_stage_s is None:
                    first_stage_s = time.perf_counter() - t0
            here = stage_peaks.setdefault(stage, {"VmRSS": 0, "RssAnon": 0})
            for k, v in read_status(proc.pid).items():
                peak[k] = max(peak[k], v)
                if k in here:
                    here[k] = max(here[k], v)
            if done:
                break
            if polls % CPU_EVERY == 0:
                for key, (group, seconds) in process_cpu(proc.pid).items():
                    cpu[key] = (telling_group(cpu.get(key, (None,))[0], group), seconds)
            polls += 1
            time.sleep(interval)
    seconds = time.perf_counter() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"sis_imagenet.py exited with {proc.returncode}; log {log_path} ends:\n{text[-4000:]}")
    mib = 1 / 1024
    return {"peak_rss_mib": max(peak["VmRSS"], peak["VmHWM"]) * mib, "peak_rss_anon_mib": peak["RssAnon"] * mib,
            "stage_peak_mib": {k: {"rss": v["VmRSS"] * mib, "anon": v["RssAnon"] * mib} for k, v in stage_peaks.items()},
            "seconds": seconds, "startup_s": first_stage_s, "cpu": cpu_by_group(cpu),
            "cpu_s": sum(cpu_s for _, cpu_s in cpu.values()), "log": text}


def stage_figures(log: str, epochs: int) -> dict:
    """From a finished run's log: images per split, each stage's seconds and images/s, the planned ETA."""
    train, val = map(int, PLAN.search(log).groups())
    stages = {int(k): float(s) for k, s in STAGE_DONE.findall(log)}
    trials = int(TRIALS.search(log).group(2)) if TRIALS.search(log) else 0
    work = {1: ("selection", train + val), 2: ("training", trials * epochs * train), 3: ("summary", val)}
    out = {"train_images": train, "val_images": val, "trials": trials,
           "planned": PLANNED.search(log).group(1) if PLANNED.search(log) else None}
    for k, (name, images) in work.items():
        s = stages.get(k)
        out[f"{name}_s"] = s
        out[f"{name}_images_per_s"] = images / s if s else None
    return out


def tree_bytes(path: str) -> dict[str, int]:
    """Bytes under path: all, and the selection store (selections/) alone."""
    def walk(p):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(p) for f in files)
    return {"out_bytes": walk(path), "store_bytes": walk(os.path.join(path, "selections"))}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--source", default=None, help="folder with train/ and val/ Parquet of encoded images (overinterp.synthetic imagenet-shaped)")
    p.add_argument("--n", default=f"10000,100000,{FULL}", help=f"comma-separated images per split; {FULL}: the whole source")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model", default="digits_cnn", help="the explained model (random weights) and the subset models")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--pixels-per-step", type=int, default=32, help="BGSIS k")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--select-batch", type=int, default=None,
                   help="images per selection call and per store shard (default: the job's rule, 1,024 at 8 px); the driver reads every shard's ids")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples of /proc/<pid>/status")
    p.add_argument("--scratch", default=None, help="folder for outputs (default: a temporary one, removed at the end)")
    p.add_argument("--quick", action="store_true", help="write a 2,000-image source of 10 classes; N = 100 and 1,000")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.num_classes = "100,1000", 10
    sizes = [FULL if n.strip() == FULL else int(n) for n in args.n.split(",")]

    started = start()
    scratch = args.scratch or tempfile.mkdtemp(prefix="driver_rss-")
    os.makedirs(scratch, exist_ok=True)
    try:
        source = args.source
        if args.quick:
            source = os.path.join(scratch, "source")
            write_imagenet_shaped(source, train=1000, val=1000, folder_images=0, num_classes=args.num_classes, rows_per_shard=250)
        elif source is None:
            raise SystemExit("driver_rss.py: error: give --source DIR (python -m overinterp.synthetic imagenet-shaped DIR writes one), or --quick")
        weights = os.path.join(scratch, "weights.pt")
        torch.manual_seed(0)
        torch.save(create_model(args.model, num_classes=args.num_classes).state_dict(), weights)
        common = ["--train", os.path.join(source, "train"), "--val", os.path.join(source, "val"), "--model", args.model,
                  "--weights", weights, "--train-model", args.model, "--num-classes", str(args.num_classes),
                  "--image-size", str(args.image_size), "--pixels-per-step", str(args.pixels_per_step), "--seeds", "0",
                  "--epochs", str(args.epochs), "--max-hours", "0", *(["--select-batch", str(args.select_batch)] if args.select_batch else [])]
        runs = []
        for n in sizes:
            out = os.path.join(scratch, f"out-{n}")
            shutil.rmtree(out, ignore_errors=True)
            res = run_driver([*common, *([] if n == FULL else ["--max-images", str(n)]), "--out", out], out + ".log", args.interval)
            log = res.pop("log")
            runs.append({"n": n, **res, **stage_figures(log, args.epochs), **tree_bytes(out)})
            r = runs[-1]
            print(f"N={n}: {r['train_images']:,} + {r['val_images']:,} images in {r['seconds']:.0f} s, "
                  f"peak driver RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
            if args.scratch is None:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)

    small, large = runs[0], runs[-1]
    report = {
        "benchmark": "driver_rss", "machine": machine(packages=("torchvision", "ray", "mlflow", "pyarrow")),
        "measured": "the driver process only (jobs/sis_imagenet.py); Ray workers are separate processes",
        "settings": {"n": [str(n) for n in sizes], "source": args.source or "quick", "classes": args.num_classes, "model": args.model,
                     "image_size": args.image_size, "pixels_per_step": args.pixels_per_step, "epochs": args.epochs, "seeds": [0],
                     "select_batch": args.select_batch or streamed_select_batch(args.image_size),
                     "interval_s": args.interval, "quick": args.quick},
        "runs": runs,
        "rss_growth_mib": large["peak_rss_mib"] - small["peak_rss_mib"],
        "anon_growth_mib": large["peak_rss_anon_mib"] - small["peak_rss_anon_mib"],
        "images_ratio": (large["train_images"] + large["val_images"]) / (small["train_images"] + small["val_images"]),
    }

    def rate(x):
        return "–" if x is None else f"{x:,.0f}"

    print(f"\nThe streamed run per N (jobs/sis_imagenet.py; driver process only); {describe(report['machine'])}")
    print(f"{'train+val':>19}{'wall s':>8}{'start s':>8}{'sel img/s':>10}{'train img/s':>12}{'summ img/s':>11}"
          f"{'peak RSS':>9}{'RssAnon':>8}{'store MiB':>10}  planned")
    for r in runs:
        print(f"{r['train_images']:>10,}+{r['val_images']:<8,}{r['seconds']:>8.0f}{r['startup_s'] or 0:>8.0f}"
              f"{rate(r['selection_images_per_s']):>10}{rate(r['training_images_per_s']):>12}{rate(r['summary_images_per_s']):>11}"
              f"{r['peak_rss_mib']:>9.0f}{r['peak_rss_anon_mib']:>8.0f}{r['store_bytes'] / 2**20:>10.1f}  {r['planned']}")
    print("peak driver RSS (RssAnon) in MiB while each stage ran: "
          + "; ".join(f"N={r['n']}: " + ", ".join(f"{k} {v['rss']:.0f} ({v['anon']:.0f})" for k, v in r["stage_peak_mib"].items())
                      for r in runs))
    for r in runs:
        top = ", ".join(f"{g} {v['cpu_s']:.0f} s (x{v['processes']})" for g, v in list(r["cpu"].items())[:12])
        print(f"CPU seconds at N={r['n']}: {r['cpu_s']:.0f} in {r['seconds']:.0f} s wall; by process: {top}")
    print(f"peak driver RSS grew {report['rss_growth_mib']:+.0f} MiB (RssAnon {report['anon_growth_mib']:+.0f} MiB) "
          f"for {report['images_ratio']:.1f}x the images")
    return finish(report, started, args.json_out)


if __name__ == "__main__":
    main()
