"""benchmarks/bench_explain.py in quick mode (a 100-step prior, 8 VCEs; about 30 s on one CPU thread):
the script runs end to end, writes its BENCH_JSON line, and its tables hold every objective and
method, and every kind of images with measures in range."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.benchmark
def test_bench_explain_quick(tmp_path, capsys):
    pytest.importorskip("diffusers")  # the `explain` extra
    import bench_explain

    report = bench_explain.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--json-out", str(tmp_path / "e.json")])
    assert "BENCH_JSON " in capsys.readouterr().out and json.load(open(tmp_path / "e.json"))["quick"] is True
    assert {(s["objective"], s["method"]) for s in report["speed"]} == {
        (o, m) for o in ("vce", "disagreement", "class_visualisation") for m in ("noise", "universal")}
    assert all(s["images_per_s"] > 0 and 0 <= s["success"] <= 1 for s in report["speed"])
    names = [r["images"] for r in report["measures"]]
    assert names[:4] == ["real train (floor)", "unguided samples", "VCE, noise", "VCE, universal"] and names[4].startswith("PGD L2")
    assert all(r["frechet"] >= 0 and 0 <= r["discriminator"] <= 1 for r in report["measures"])
    assert os.listdir(tmp_path / "cache")  # the prior is cached for the next run
