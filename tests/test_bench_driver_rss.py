"""benchmarks/driver_rss.py in quick mode: the streamed run (jobs/sis_imagenet.py on ImageNet-shaped
Parquet) at N = 100 and 10·N = 1,000 images per split, and the claim the benchmark exists for: the
driver's peak RSS does not grow with the number of images (it streams them and holds no per-image
Python state).

Bound: peak RSS at 10·N minus peak RSS at N <= MAX_GROWTH_MIB = 100. The driver's ~1.2 GiB is mostly
imports (torch, Ray, MLflow); two runs of the same N differ by up to ~50 MiB (BENCHMARKS.md), so 100
leaves room for that and fails when the driver gains ~55 KiB for each of the 1,800 more images. The
full benchmark (N = 10,000 to 1,331,167) is the finer measurement. About 4 minutes on 2 CPUs (two
streamed runs, one after another: at once, their two local Rays made it slower).
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

MAX_GROWTH_MIB = 100  # see the module docstring
MIN_DRIVER_MIB = 300  # the driver imports torch and Ray: a smaller peak means the sampler read some other process


def test_driver_rss_does_not_grow_with_the_images(tmp_path, capsys):
    import driver_rss

    report = driver_rss.main(["--quick", "--json-out", str(tmp_path / "d.json")])
    assert "BENCH_JSON " in capsys.readouterr().out
    saved = json.load(open(tmp_path / "d.json"))
    assert saved["rss_growth_mib"] == report["rss_growth_mib"]
    small, large = saved["runs"]
    assert (small["train_images"], small["val_images"], large["train_images"], large["val_images"]) == (100, 100, 1000, 1000)
    for r in (small, large):
        assert r["peak_rss_mib"] > MIN_DRIVER_MIB, r
        assert r["trials"] == 3 and r["store_bytes"] > 0, r
        assert all(r[f"{s}_images_per_s"] > 0 for s in ("selection", "training", "summary")), r
        assert r["selection_s"] + r["training_s"] + r["summary_s"] < r["seconds"], r
        # every stage was sampled, and the run's peak is one of theirs
        assert set(r["stage_peak_mib"]) == {"start", "1", "2", "3"}, r["stage_peak_mib"]
        assert max(v["rss"] for v in r["stage_peak_mib"].values()) <= r["peak_rss_mib"] + 1e-6, r
    assert large["store_bytes"] > small["store_bytes"]
    assert saved["rss_growth_mib"] <= MAX_GROWTH_MIB, (
        f"the driver's peak RSS grew {saved['rss_growth_mib']:+.0f} MiB from 100 to 1,000 images per split "
        f"({small['peak_rss_mib']:.0f} -> {large['peak_rss_mib']:.0f} MiB); it should stay flat (<= {MAX_GROWTH_MIB} MiB): "
        f"something on the driver holds per-image data")
