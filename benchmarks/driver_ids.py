"""The driver's per-image state at ImageNet's count: "which images are done" and "count the images".

Each measurement runs in a fresh Python process with one checkout of overinterp on its path: this
one ("after") and the package as it was at --before (extracted with `git archive`). The process
imports the package, resets the kernel's peak-RSS mark (/proc/self/clear_refs), runs one task and
reports its wall time and peak RSS growth (VmHWM after - VmRSS before):

    done   store.done_ids of the train and test splits of a store holding every image of the source
           (1,281,167 + 50,000 ids in shards of --shard-rows, as selection writes them), and the
           sorted id array the driver hands the workers to skip
    count  the streamed source's count of images: the Parquet splits (footers) and the ImageFolder
           (listings), through pipeline.stream.count_images

    python benchmarks/driver_ids.py --source /work/data/imagenet-shaped --before <commit of the earlier code> --repeats 3
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import _common

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import numpy as np
from overinterp import store
from overinterp.pipeline.stream import count_images
from overinterp.pipeline.images import list_classes
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024  # MiB
import pyarrow as pa
pa.array(np.arange(3)).to_numpy()  # pyarrow's numpy bridge loads lazily (~27 MiB): a fixed cost, not the task's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the peak below is this task's
rss0, t0 = status("VmRSS"), time.perf_counter()
if spec["task"] == "done":
    done = {s: store.done_ids(spec["store"], "none", "random-seed0", s) for s in ("train", "test")}
    # what the driver ships to the workers: the sorted id array (a set is sorted into one first)
    skip = {s: d if isinstance(d, np.ndarray) else np.array(sorted(d), dtype=np.int64) for s, d in done.items()}
    n = sum(len(d) for d in done.values())
else:
    src = spec["source"]
    classes = list_classes(src + "/folder/train")
    n = sum(count_images(src + "/" + s, None, None) for s in ("train", "val"))
    n += sum(count_images(src + "/folder/" + s, classes, None) for s in ("train", "val"))
print(json.dumps({"package": store.__file__, "n": int(n), "seconds": time.perf_counter() - t0, "peak_mib": status("VmHWM") - rss0}))
"""


def build_store(root: str, source: str, shard_rows: int) -> int:
    """Random-baseline rows (no order: cheap to write) for every image id of the Parquet source."""
    import pyarrow.parquet as pq

    from overinterp import store

    n = 0
    for split, folder in (("train", "train"), ("test", "val")):
        t = pq.read_table(f"{source}/{folder}", columns=["image_id", "label"])
        ids, labels = t.column("image_id").to_numpy(), t.column("label").to_numpy()
        for s in range(0, len(ids), shard_rows):
            store.write_rows(root, model="none", selector="random-seed0", selector_params='{"seed": 0}', split=split,
                             image_id=ids[s : s + shard_rows], label=labels[s : s + shard_rows], height=8, width=8)
        n += len(ids)
    return n


def run(checkout: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    # cwd = the checkout: `python -c` puts the working directory ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, cwd=checkout, capture_output=True, text=True, check=True,
                         timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--source", default="/work/data/imagenet-shaped", help="python -m overinterp.synthetic imagenet-shaped output")
    p.add_argument("--before", default="main", help="git revision of the package to compare with")
    p.add_argument("--store", default=None, help="reuse (or build) the store here; default: a temporary folder")
    p.add_argument("--shard-rows", type=int, default=64, help="rows per shard (the default --select-batch)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    started = _common.start()
    tmp = tempfile.mkdtemp(prefix="driver-ids-")
    before = os.path.join(tmp, "before")
    os.makedirs(before)
    rev = subprocess.run(["git", "-C", _common.ROOT, "rev-parse", a.before], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(f"git -C {_common.ROOT} archive {rev} overinterp | tar -x -C {before}", shell=True, check=True)
    root = a.store or os.path.join(tmp, "selections")
    try:
        if not os.path.isdir(root):
            print(f"building a store of every source image id under {root} ...", flush=True)
            build_store(root, a.source, a.shard_rows)
        runs = {(task, impl): [] for task in ("done", "count") for impl in ("before", "after")}
        for _ in range(a.repeats):  # interleaved, so load drifts hit both alike
            for task, impl in runs:
                runs[(task, impl)].append(run(before if impl == "before" else _common.ROOT, {"task": task, "store": root, "source": a.source}))
        rows = {f"{t}/{i}": {"package": r[0]["package"], "n": r[0]["n"], "seconds": [x["seconds"] for x in r], "peak_mib": [x["peak_mib"] for x in r],
                             "median_seconds": statistics.median(x["seconds"] for x in r),
                             "median_peak_mib": statistics.median(x["peak_mib"] for x in r)} for (t, i), r in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the store too, unless --store kept it outside
    m = _common.machine(packages=("pyarrow", "numpy", "ray"))
    print(f"{_common.describe(m)}; before = {rev[:12]}, {a.repeats} runs each, shards of {a.shard_rows} rows")
    print("| task | code | items | wall s (median) | peak RSS growth MiB (median) |\n|---|---|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k.split('/')[0]} | {k.split('/')[1]} | {r['n']:,} | {r['median_seconds']:.2f} | {r['median_peak_mib']:.0f} |")
    _common.finish({"machine": m, "before": rev, "shard_rows": a.shard_rows, "repeats": a.repeats, "rows": rows}, started, a.json_out)


if __name__ == "__main__":
    main()
