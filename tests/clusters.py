"""Simulated multi-node Ray clusters for tests: Ray's fake multi-node autoscaler, and helpers to
sample which actors run where.

The autoscaling cluster is shaped like cluster.yaml: a head with CPU 0 and a 1-GPU worker type with
min_workers 0, started on demand. Its GPUs are Ray resources only (torch.cuda stays unavailable).
It runs in its own temp dir and port, so the test session's own local Ray is untouched, and it is
stopped by killing exactly the processes that carry its temp dir (`ray stop` would stop every Ray
of this user, the session's included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import yaml

import procs

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaler_config(gcs_port: int, gpu_workers: int = 3, worker_cpus: int = 1) -> dict:
    """The whole fake_multinode config (Ray 2.60's wheel lacks the example it would extend)."""
    return {
        "cluster_name": "overinterp-fake",
        "max_workers": gpu_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Launch nodes inside the autoscaler's update, not in its background launcher thread. With the
            # thread, an update reads the node list, then the launch counter after the launcher has
            # finished (a 1.3 s update on a busy machine): the launched nodes are in neither, it launches
            # one more than max_workers, and then terminates a node "(max_workers_per_type)", with
            # whatever trial had been placed there (seen: a full-image trial killed 12 s into the smoke run).
            "foreground_node_launch": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu-1x": {"resources": {"CPU": worker_cpus, "GPU": 1, "object_store_memory": 300_000_000}, "node_config": {},
                       "min_workers": 0, "max_workers": gpu_workers},
        },
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def kill_processes_with(marker: str) -> int:
    """SIGKILL every process whose command line contains `marker` (this cluster's temp dir)."""
    killed = 0
    for pid, p in procs.processes().items():
        if pid != os.getpid() and marker.encode() in p.cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


@dataclass
class FakeCluster:
    """A running fake autoscaling cluster: its address, dashboard and the environment to reach it."""

    address: str
    dashboard: str
    temp_dir: str
    env: dict
    config_path: str

    def stop(self) -> None:
        for _ in range(3):  # fake worker nodes started late may escape the first sweep
            if not kill_processes_with(self.temp_dir):
                break
            time.sleep(1)


def start_fake_cluster(gpu_workers: int = 3) -> FakeCluster:
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port, dash = free_port(), free_port()
    config_path = os.path.join(temp_dir, "autoscaler.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(autoscaler_config(port, gpu_workers), f)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "PYTHONUNBUFFERED": "1"}
    if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", f"--autoscaling-config={config_path}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    return FakeCluster(address, f"http://127.0.0.1:{dash}", temp_dir, {**env, "RAY_ADDRESS": address}, config_path)


SAMPLER = r"""
import json, sys, time
from ray.util.state import list_actors, list_nodes
dashboard, path, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(path, "a") as f:
    while True:
        try:
            actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000, raise_on_missing_output=False)
            nodes = list_nodes(address=dashboard, limit=100, raise_on_missing_output=False, detail=True)
            rec = {"actors": [{"class_name": a.class_name, "node_id": a.node_id, "required_resources": dict(a.required_resources or {})}
                              for a in actors],
                   "gpu_nodes": [n.node_id for n in nodes if n.state == "ALIVE" and (n.resources_total or {}).get("GPU", 0) > 0]}
        except Exception as e:  # the dashboard is briefly unreachable while nodes start: sample again
            rec = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        f.write(json.dumps({"t": time.time(), **rec}) + "\n")
        f.flush()
        time.sleep(period)
"""


@dataclass
class ActorSampler:
    """Polls the cluster's actors and nodes (Ray's state API, through the dashboard) from a separate
    process with the cluster's environment: the dashboard wants the cluster's auth token, and this
    test process's Ray may have settled on another auth mode already."""

    dashboard: str
    env: dict
    period_s: float = 0.5
    samples: list = field(default_factory=list)  # (time, [actor dicts alive then])
    gpu_nodes_seen: set = field(default_factory=set)
    errors: list = field(default_factory=list)  # why samples failed (a dashboard too slow to answer on a busy machine)

    def __enter__(self):
        fd, self._path = tempfile.mkstemp(prefix="actor-samples-", suffix=".jsonl")
        os.close(fd)
        self._proc = subprocess.Popen([sys.executable, "-c", SAMPLER, self.dashboard, self._path, str(self.period_s)], env=self.env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        import json

        self._proc.terminate()
        self._proc.wait(timeout=30)
        with open(self._path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the last line, cut by terminate()
                if "error" in rec:
                    self.errors.append(rec["error"])
                else:
                    self.samples.append((rec["t"], rec["actors"]))
                    self.gpu_nodes_seen |= set(rec["gpu_nodes"])
        os.remove(self._path)

    def concurrent(self, class_part: str) -> list[list[dict]]:
        """Per sample, the alive actors whose class name contains `class_part`."""
        return [[a for a in actors if class_part in a["class_name"]] for _, actors in self.samples]
