"""Fault injection on a ray.cluster_utils.Cluster (a CPU-0 head and two worker nodes with one fake
GPU each), run as a script by tests/test_multinode.py so the test process keeps its own Ray.

    python tests/node_loss.py selection OUT      # remove a worker node in the middle of a selection batch;
                                                 # ends once selection has finished
    python tests/node_loss.py train-worker OUT   # two Train workers (DDP) per trial, one on each node, on
                                                 # the Parquet smoke data (11 val images: an odd count):
                                                 # SIGKILL one after the trial's first checkpoint;
                                                 # ends once that trial has finished
    python tests/node_loss.py trial-process OUT  # one worker per trial, which trains in its Tune trial's
                                                 # process: SIGKILL that process after its first epoch
                                                 # state is written; ends once that trial has finished

The job runs as its own driver process against the cluster; this script watches --out, injects the
fault, waits for the job, and prints one JSON line describing what it did.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

from ray._private import ray_constants
from ray.cluster_utils import Cluster

import procs

SELECT_BATCH = 4
TRAIN_IMAGES = 96  # the smoke run's train split
LOST_LINE = "a selection worker was lost"  # what select_stage.select_stream prints before it selects again
SELECTION_DONE = "stage 3/4"  # the driver's line when subset training starts: every selection is stored

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(pattern: str, job: subprocess.Popen, timeout: float) -> list[str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = glob.glob(pattern)
        if found:
            return found
        if job.poll() is not None:
            raise SystemExit(f"the job ended ({job.returncode}) before {pattern} appeared:\n{job.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise SystemExit(f"{pattern} did not appear within {timeout} s")


def _node_mid_batch(workers: list, job: subprocess.Popen, timeout: float):
    """The first worker node seen running a selection batch (its selection actor is a child of the
    node's raylet). Removed then, the node takes a batch with it; removed while its actor waits,
    nothing is lost."""
    raylets = {w.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: w for w in workers}
    t0 = time.time()
    while time.time() - t0 < timeout:
        if job.poll() is not None:
            raise SystemExit(f"the job ended ({job.returncode}) before a selection batch was seen on a worker node")
        busy = [raylets[parent] for parent in procs.selecting().values() if parent in raylets]
        if busy:
            return busy[0]
        time.sleep(0.02)
    raise SystemExit(f"no selection batch seen on a worker node in {timeout:.0f} s")


def main(mode: str, out: str) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cpus = 1 if mode == "selection" else 2
    workers = [cluster.add_node(num_cpus=cpus, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    env["RAY_ADDRESS"] = cluster.address
    if mode == "selection":
        cmd = [sys.executable, "-m", "overinterp.cli", "run", "--smoke", "--select-batch", str(SELECT_BATCH), "--seeds", "0,1", "--input-dropout", "0", "--selectors", "backselect", "--fill", "mean",
               "--out", out]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "jobs", "sis_imagenet.py"), "--smoke-test", "--epochs", "4", "--max-workers", "1", "--out", out,
               *(["--workers-per-trial", "2", "--smoke-format", "parquet"] if mode == "train-worker" else [])]
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report = {"mode": mode}
    try:
        if mode == "selection":
            shards = os.path.join(out, "selections", "digits_cnn-s0", "backselect", "train", "part-*.parquet")
            _wait_for(shards, job, 900)
            busy = _node_mid_batch(workers, job, 300)
            # one shard per batch: fewer shards than batches means the split was still being selected
            report["shards_before_removal"] = len(glob.glob(shards))
            report["train_batches"] = -(-TRAIN_IMAGES // SELECT_BATCH)
            cluster.remove_node(busy, allow_graceful=False)  # the node, its raylet and every actor on it
            report["removed_node"] = busy.node_id
        elif mode == "train-worker":
            # a registered checkpoint (its directory appears before Train records it): the snapshot
            snapshots = _wait_for(os.path.join(out, "train-runs", "*", "checkpoint_manager_snapshot.json"), job, 1200)
            report["trial"] = os.path.basename(os.path.dirname(snapshots[0]))
            pids = procs.titled(b"ray::RayTrainWorker")  # --max-workers 1: one trial at a time, so this trial's workers
            os.kill(pids[0], signal.SIGKILL)
            report["killed_pid"] = pids[0]
        else:
            states = _wait_for(os.path.join(out, "trials", "*", "state.pt"), job, 1200)  # written whole (fs.write_bytes)
            report["trial"] = os.path.basename(os.path.dirname(states[0]))
            pids = procs.titled(b"ray::ImplicitFunc")  # the Tune trial's process: one trial at a time
            os.kill(pids[0], signal.SIGKILL)
            report["killed_pid"] = pids[0]
        if mode == "selection":
            # selection finished (stage 3 started) is the proof; the subset trials would only add minutes
            lines: list[str] = []
            threading.Thread(target=lambda: lines.extend(iter(job.stdout.readline, "")), daemon=True).start()
            t0 = time.time()
            while not any(SELECTION_DONE in ln for ln in lines) and job.poll() is None and time.time() - t0 < 1200:
                time.sleep(0.2)
            if not any(SELECTION_DONE in ln for ln in lines):
                sys.stderr.write("".join(lines)[-6000:])
                return job.wait(timeout=60) or 1
            job.terminate()
            job.wait(timeout=120)
            output = "".join(lines)
            report["lost_worker_lines"] = [ln.strip() for ln in output.splitlines() if LOST_LINE in ln]
        else:
            # that trial finishing is the proof; the job's other trials would only add minutes
            _wait_for(os.path.join(out, "trials", report["trial"], "result.json"), job, 1200)
            job.terminate()
            output, _ = job.communicate(timeout=1500)
        sys.stderr.write(output[-6000:])
    finally:
        if job.poll() is None:
            job.kill()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
