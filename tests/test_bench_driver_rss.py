"""benchmarks/driver_rss.py runs (quick mode: the ImageNet job twice, on 16 and 32 images per split)
and reports the driver's peak RSS for both sizes.

Marked `benchmark` (two full runs of jobs/sis_imagenet.py: about 12 minutes on 2 CPUs), so it runs
only when selected: `python -m pytest -m benchmark`. It checks that the figures exist, not what
they are: memory is for BENCHMARKS.md.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

pytestmark = pytest.mark.benchmark


def test_driver_rss_quick(tmp_path, capsys):
    import driver_rss

    report = driver_rss.main(["--quick", "--json-out", str(tmp_path / "d.json")])
    assert "BENCH_JSON " in capsys.readouterr().out
    saved = json.load(open(tmp_path / "d.json"))
    assert saved["settings"]["images_per_split"] == [16, 32] and saved["ratio"] == report["ratio"]
    for n in ("16", "32"):
        assert saved["median"][n]["peak_rss_mib"] > 0 and saved["median"][n]["seconds"] > 0
    assert all(run["samples"] > 0 and run["peak_rss_mib"] >= run["peak_vmrss_sampled_mib"] > 0 for run in saved["runs"])
    assert saved["ratio"] > 0 and saved["machine"]["cpu_count"] >= 1 and saved["machine"]["ray"]
