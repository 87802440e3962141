"""benchmarks/gpu_check.py in its --cpu mode: every check runs (or says why not) and passes."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")
# every CUDA-only path the script must cover, by the names its table and JSON give them
CHECKS = ["bs_engine", "autocast_bf16", "autocast_fp16", "bgsis", "road_fill", "chunk_sizing", "train_step", "eval_forward",
          "dataparallel", "stream_trial_1gpu", "ray_train_nccl", "explain_stage", "device_rates"]


def test_gpu_check_cpu_mode_runs_every_check_and_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu_mode"] and report["device"] == "cpu"
    rows = {r["check"]: r for r in report["checks"]}
    assert list(rows) == CHECKS
    for name, r in rows.items():
        assert r["result"] == "pass" or (r["result"].startswith("skipped (") and len(r["result"]) > len("skipped ()")), (name, r)
    # the comparisons ran, on the figures they report: identical orders, the fill within its bound
    assert all(rows["bs_engine"]["identical"]) and all(rows["bgsis"]["identical"])
    assert rows["road_fill"]["max_abs_diff"] <= 1e-4 and rows["eval_forward"]["agree"] > 0
    assert report["rate_lines"] and all(line.strip().startswith("DeviceRate(") for line in report["rate_lines"])
    assert "FAIL" not in proc.stdout


def test_gpu_check_runs_only_the_chosen_checks_and_refuses_an_unknown_one(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--checks", "road_fill,bgsis", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["check"] for r in json.loads(out.read_text())["checks"]] == ["bgsis", "road_fill"]  # the table's order
    bad = subprocess.run([sys.executable, SCRIPT, "--cpu", "--checks", "bs_engine,warp"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown warp" in bad.stderr and "choose from bs_engine" in bad.stderr
