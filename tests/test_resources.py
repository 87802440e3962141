"""Resource planning from what a cluster can offer, and the embedded local Ray's reach."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from overinterp.config import ConfigError, ResourceFlags
from overinterp.pipeline.resources import Capacity, NodeType, _node_types_from_yaml, plan_resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTOSCALING = Capacity((NodeType("head", 0, 0, 1), NodeType("gpu-1x", 1, 1, 3)), "autoscaler config test")


def test_cluster_yaml_capacity():
    cap = _node_types_from_yaml(yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml"))), "cluster.yaml")
    types = {t.name: t for t in cap.node_types}
    assert types["head"] == NodeType("head", 0, 0, 1)
    assert types["gpu-1x"] == NodeType("gpu-1x", 8, 1, 8) and types["gpu-8x"] == NodeType("gpu-8x", 96, 8, 1)
    plan = plan_resources(cap)
    assert plan.use_gpu and plan.select_workers == 16 and plan.trial_concurrency == 16  # 8 x 1 GPU + 1 x 8 GPUs


def test_the_gpu_kind_ray_names_reaches_the_plan():
    config = {"max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "gpu": {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:H100": 1}, "max_workers": 4}}}
    cap = _node_types_from_yaml(config, "test.yaml")
    assert cap.node_types[1] == NodeType("gpu", 8, 1, 4, "H100") and cap.accelerator == "H100"
    plan = plan_resources(cap)
    assert plan.accelerator == "H100" and "4 GPU actor(s) on H100 of" in plan.describe()
    assert plan_resources(cap, ResourceFlags(gpus_per_worker=0)).accelerator == ""  # selection on CPUs
    assert plan_resources(AUTOSCALING).accelerator == ""  # no kind named


def test_gpus_that_can_exist_are_asked_for_before_any_node_is_up():
    plan = plan_resources(AUTOSCALING)  # no worker is up yet: the head has CPU 0
    assert plan.use_gpu and plan.select_workers == 3 and plan.trial_concurrency == 3
    assert plan.worker_request() == {"num_gpus": 1.0}  # Ray Data adds 1 CPU to a GPU actor itself
    assert plan.trial_request() == {"cpu": 1.0, "gpu": 1.0}  # a whole GPU per trial: none shared
    assert "GPU actor(s)" in plan.describe() and plan.as_params()["resources.use_gpu"] is True


def test_a_cluster_that_can_never_have_gpus_runs_on_cpus():
    plan = plan_resources(Capacity((NodeType("local", 2, 0, 1),), "nodes alive now"))
    assert not plan.use_gpu and plan.select_workers == 2 and plan.trial_concurrency == 2
    assert plan.worker_request() == {"num_cpus": 1.0} and plan.trial_request() == {"cpu": 1.0, "gpu": 0.0}
    with pytest.raises(ConfigError, match="can never have any"):
        plan_resources(Capacity((NodeType("local", 2, 0, 1),), "nodes alive now"), ResourceFlags(gpus_per_worker=1))


def test_flags_override_the_plan():
    plan = plan_resources(AUTOSCALING, ResourceFlags(max_workers=2, gpus_per_trial=0.5))
    assert plan.select_workers == 2 and plan.trial_concurrency == 2 and plan.gpus_per_trial == 0.5
    assert plan.worker_slots == 3 == plan_resources(AUTOSCALING, ResourceFlags()).select_workers  # what --max-workers left out
    two_cpus = Capacity((NodeType("gpu-1x", 2, 1, 3),), "test")
    assert plan_resources(two_cpus, ResourceFlags(gpus_per_trial=0.5)).trial_concurrency == 6  # two trials share a GPU, as asked
    assert plan_resources(AUTOSCALING, ResourceFlags(gpus_per_trial=0.5)).trial_concurrency == 3  # ... where each node has 2 CPUs for them
    cpu = plan_resources(AUTOSCALING, ResourceFlags(gpus_per_worker=0))
    assert not cpu.use_gpu and cpu.select_workers == 3
    assert plan.overrides == {"max_workers": 2, "gpus_per_trial": 0.5} and "--max-workers 2" in plan.describe()
    with pytest.raises(ConfigError, match="fits one worker"):
        plan_resources(AUTOSCALING, ResourceFlags(cpus_per_worker=4))


@pytest.mark.parametrize("flags, match", [({"max_workers": 0}, "--max-workers"), ({"gpus_per_trial": -1}, "--gpus-per-trial"),
                                          ({"gpus_per_trial": 1.5}, "whole number"), ({"cpus_per_worker": 0}, "--cpus-per-worker 0")])
def test_bad_resource_flags(flags, match):
    with pytest.raises(ConfigError, match=match):
        ResourceFlags(**flags)


def test_streamed_trials_leave_a_cpu_for_ray_data():
    local = plan_resources(Capacity((NodeType("local", 2, 0, 1),), "nodes alive now"))
    assert local.streamed_trial_concurrency(1) == 1  # the other CPU reads, joins and decodes
    assert plan_resources(AUTOSCALING).streamed_trial_concurrency(1) == 2


LISTENERS = r'''
import glob, json, os, socket, struct
from overinterp.pipeline.resources import ray_init_local
import ray
ray_init_local(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())
session = ray._private.worker._global_node.get_session_dir_path()
pids = set()
for c in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        if session.encode() in open(c, "rb").read() or int(c.split("/")[2]) == os.getpid():
            pids.add(c.split("/")[2])
    except OSError:
        pass
inodes = set()
for pid in pids:
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
found = []
for table, fam in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            addr = f[1].split(":")[0]
            raw = bytes.fromhex(addr)
            ip = socket.inet_ntop(socket.AF_INET, raw[::-1]) if fam == 4 else socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i+4][::-1] for i in range(0, 16, 4)))
            found.append(ip)
print(json.dumps({"processes": len(pids), "listening": found}))
ray.shutdown()
'''


def test_the_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    p = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["processes"] >= 3 and len(report["listening"]) >= 3  # the GCS, the raylet, the driver's core worker, ...
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in report["listening"]), report


OTHER_CLUSTER = r'''
import json
import ray
from ray._private.utils import write_ray_address
from ray.cluster_utils import Cluster

# someone else's Ray on this machine, announced the way `ray start` does (ray_current_cluster)
other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"someone_elses": 1}, "include_dashboard": False})
write_ray_address(other.address)
from overinterp.pipeline.resources import ensure_ray
ensure_ray()
print(json.dumps(ray.cluster_resources()))
ray.shutdown()
other.shutdown()
'''


def test_the_embedded_ray_never_joins_another_cluster_on_the_machine():
    """A plain ray.init() joins the last cluster `ray start` announced: without --ray-address (or
    $RAY_ADDRESS) overinterp must start its own. Ray's temp dir is private to this test."""
    import json
    import tempfile

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    p = subprocess.run([sys.executable, "-c", OTHER_CLUSTER], capture_output=True, text=True, timeout=300,
                       env={**env, "TMPDIR": tmp, "RAY_TMPDIR": tmp})
    assert p.returncode == 0, p.stderr[-3000:]
    resources = json.loads(p.stdout.strip().splitlines()[-1])
    assert "someone_elses" not in resources, resources


def test_an_unreadable_autoscaler_is_an_error_not_a_plan_from_the_nodes_up(ray_session, tmp_path, monkeypatch):
    """Where an autoscaler serves the cluster but its node types cannot be read, the run stops with
    the reason instead of planning from the nodes alive (which, before any worker is up, have no GPU)."""
    from overinterp.pipeline import resources

    monitor = tmp_path / "monitor.py"  # a process that looks like Ray's autoscaler monitor to /proc
    monitor.write_text("import time\ntime.sleep(120)\n")
    gcs = ray_session.get_runtime_context().gcs_address
    missing = tmp_path / "gone.yaml"
    proc = subprocess.Popen([sys.executable, str(monitor), f"--gcs-address={gcs}", f"--autoscaling-config={missing}"])
    try:
        with pytest.raises(ConfigError, match=f"autoscaler reads {missing}, not a file on this node"):
            resources.discover_capacity()
        missing.write_text("cluster_name: x\n")
        with pytest.raises(ConfigError, match="a config without available_node_types"):
            resources.discover_capacity()
    finally:
        proc.kill()
    assert "nodes alive now" in resources.discover_capacity().source  # no autoscaler: the local Ray's nodes

    def unreachable():
        raise ConnectionError("GCS timed out")

    monkeypatch.setattr(resources.ray._private.state.state, "get_cluster_config", unreachable)
    with pytest.raises(ConfigError, match="could not read the autoscaler's node types .*ConnectionError: GCS timed out"):
        resources.discover_capacity()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_a_worker_exits_once_its_raylet_is_gone_and_a_driver_never_does():
    """exit_with_parent in a process whose parent is its raylet (RAY_RAYLET_PID): when that parent
    dies the process exits within seconds instead of sleeping on as an orphan; a process started by
    anything else (a driver under a shell) is not watched."""
    import subprocess
    import sys
    import time

    def orphan(env_pid: str) -> int:
        child = ("import time\nfrom overinterp.pipeline.resources import exit_with_parent\n"
                 "exit_with_parent(poll_s=0.1)\nprint('watching', flush=True)\ntime.sleep(60)\n")
        parent = ("import os, subprocess, sys\n"  # the "raylet": starts the worker, waits until it watches, dies
                  f"env = {{**os.environ, 'RAY_RAYLET_PID': {env_pid!r}.replace('SELF', str(os.getpid()))}}\n"
                  f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)\n"  # holds no pipe of ours
                  "p.stdout.readline()\nprint(p.pid, flush=True)\nos._exit(0)\n")
        out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip())

    worker = orphan("SELF")
    t0 = time.time()
    while not _gone(worker) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert _gone(worker)
    driver = orphan("1")  # RAY_RAYLET_PID names another process: not a worker of this parent
    time.sleep(1.0)
    try:
        assert not _gone(driver)
    finally:
        os.kill(driver, 9)


def test_job_env_sets_only_what_the_user_left_unset(monkeypatch):
    from overinterp.pipeline import resources

    monkeypatch.setattr(resources, "_SET_HERE", set())
    for k in resources.RAY_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's
    env = resources.job_env(resources.RAY_SETTINGS)
    assert env == {"env_vars": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}}
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "1"  # the driver's own Ray Data reads
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    # a second connection in the same process passes them again: they were set here, not by the user
    assert resources.job_env(resources.RAY_SETTINGS) == env
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "4")
    monkeypatch.setattr(resources, "_SET_HERE", set())
    assert resources.job_env(resources.RAY_SETTINGS) is None


def test_the_embedded_rays_settings_do_not_reach_a_cluster_joined_later(monkeypatch):
    """One process runs on its embedded Ray, then joins a cluster: the embedded-only settings leave
    its environment (Ray Train would pass them to the cluster's controller); a user's stay."""
    from overinterp.pipeline import resources

    monkeypatch.setattr(resources, "_SET_HERE", set())
    for k in [*resources.RAY_SETTINGS, *resources.LOCAL_RAY_SETTINGS]:
        monkeypatch.delenv(k, raising=False)
    local = resources.job_env({**resources.RAY_SETTINGS, **resources.LOCAL_RAY_SETTINGS})["env_vars"]
    assert local == {**resources.RAY_SETTINGS, **resources.LOCAL_RAY_SETTINGS}
    assert resources.job_env(resources.RAY_SETTINGS) == {"env_vars": resources.RAY_SETTINGS}
    assert not set(resources.LOCAL_RAY_SETTINGS) & set(os.environ)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # the user's own, from the start
    monkeypatch.setattr(resources, "_SET_HERE", set())
    resources.job_env({**resources.RAY_SETTINGS, **resources.LOCAL_RAY_SETTINGS})
    resources.job_env(resources.RAY_SETTINGS)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


SETTINGS_ON_A_CLUSTER = r'''
import json, os
import ray
from ray.cluster_utils import Cluster

# a cluster whose raylet did not inherit this process's environment: only the job's runtime_env reaches its workers
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
from overinterp.pipeline.resources import RAY_SETTINGS, ensure_ray
ensure_ray(cluster.address)
seen = ray.get(ray.remote(lambda names: {k: os.environ.get(k) for k in names}).remote(list(RAY_SETTINGS) + ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]))
print(json.dumps(seen))
ray.shutdown()
cluster.shutdown()
'''


def test_every_worker_of_a_run_gets_rays_settings(ray_session):
    """The settings reach the workers of the embedded Ray and of a cluster the run connects to; the
    preemption watcher is off on the embedded Ray only (one machine is never drained)."""
    import json

    from overinterp.pipeline.resources import LOCAL_RAY_SETTINGS, RAY_SETTINGS

    names = [*RAY_SETTINGS, *LOCAL_RAY_SETTINGS]
    local = ray_session.get(ray_session.remote(lambda: {k: os.environ.get(k) for k in names}).remote())
    assert local == {**RAY_SETTINGS, **LOCAL_RAY_SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", *names)}
    p = subprocess.run([sys.executable, "-c", SETTINGS_ON_A_CLUSTER], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {**RAY_SETTINGS, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": None}


def test_the_embedded_ray_job_has_no_runtime_env(ray_session):
    """Its settings reach the workers by inheritance (above): the workers Ray starts ahead for the
    first job have no runtime_env, and a job with one could not use them (two idle processes)."""
    assert not dict(ray_session.get_runtime_context().runtime_env)
