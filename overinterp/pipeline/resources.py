"""Plan resources from what the cluster *can* offer, not from the nodes up at the moment.

At a job's start an autoscaling cluster may have no worker yet (the head has CPU 0), so the nodes up
now say nothing about GPUs. A request for GPUs on a cluster that can never have them waits silently
forever, and a cluster that can have them only starts GPU nodes if someone asks. So every stage
plans from the cluster's *capacity*, found in this order:

1. the node types the autoscaler reported to the GCS (`ray._private.state.state.get_cluster_config()`:
   autoscaler v2, KubeRay);
2. the autoscaler's own config file: the `--autoscaling-config=PATH` argument of the monitor process
   serving this cluster (found under /proc on the head, where `ray job submit` drivers run), else
   `~/ray_bootstrap_config.yaml`, where `ray up` writes it on the head. Per node type:
   `resources` × min(`max_workers`, the cluster's `max_workers`), plus the head node type once;
3. no autoscaler: the nodes alive now (a fixed cluster, or the local Ray). An autoscaler whose node
   types cannot be read (a GCS that fails to answer, a config file missing on this node) is an
   error naming the cause, never a silent plan from the nodes up now.

Without an address ($RAY_ADDRESS or --ray-address) and no Ray running, the run will start its own
local Ray: its capacity is this machine's, found as Ray finds it, so a plan (and --dry-run, and a
refused one) starts no Ray node (`find_capacity`).

Flags override any part of the plan: `--max-workers` (selection actors and concurrent trials),
`--gpus-per-worker` (GPUs per selection actor; 0 forces CPUs), `--cpus-per-worker`,
`--gpus-per-trial` (fractions share a GPU, only when asked for).
"""

from __future__ import annotations

import glob
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import ray

from overinterp.config import ConfigError, ResourceFlags


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_count: int  # nodes of this type the cluster may run at once
    accelerator: str = ""  # its GPU kind as Ray names it (e.g. "H100"); "" where unknown


ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource naming a node's GPU kind


def _node_type(name: str, resources: Mapping, count: int) -> NodeType:
    """A node type from Ray's resources of one node ({"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1, ...})."""
    kind = next((k[len(ACCELERATOR_PREFIX):] for k in resources if k.startswith(ACCELERATOR_PREFIX)), "")
    return NodeType(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), count, kind)


@dataclass(frozen=True)
class Capacity:
    """The most the cluster can offer at once, node type by node type."""

    node_types: tuple[NodeType, ...]
    source: str  # where the figures came from, for the printed plan

    @property
    def max_gpus(self) -> float:
        return sum(t.gpus * t.max_count for t in self.node_types)

    @property
    def max_cpus(self) -> float:
        return sum(t.cpus * t.max_count for t in self.node_types)

    @property
    def accelerator(self) -> str:
        """The GPU kind of the first node type with named GPUs ("" where none is named)."""
        return next((t.accelerator for t in self.node_types if t.gpus and t.accelerator), "")

    def slots(self, cpus: float, gpus: float) -> int:
        """How many actors asking (cpus, gpus) fit on all nodes at once (per-node packing)."""
        total = 0
        for t in self.node_types:
            fits = [math.floor(t.cpus / cpus + 1e-9) if cpus > 0 else math.inf, math.floor(t.gpus / gpus + 1e-9) if gpus > 0 else math.inf]
            per_node = min(fits)
            total += 0 if per_node == math.inf else per_node * t.max_count
        return int(total)


@dataclass(frozen=True)
class ResourcePlan:
    """What every stage asks Ray for. Printed at the start of a job and logged to MLflow."""

    use_gpu: bool
    select_workers: int  # most selection actors at once (Ray Data's pool grows to it as nodes arrive)
    cpus_per_worker: float
    gpus_per_worker: float
    trial_concurrency: int  # most training trials at once (streamed runs: streamed_trial_concurrency, set by driver.prepare)
    cpus_per_trial: float
    gpus_per_trial: float
    capacity: str  # e.g. "autoscaler config /home/ray/ray_bootstrap_config.yaml: gpu-1x 8×{CPU 8, GPU 1}"
    overrides: dict = field(default_factory=dict)
    max_cpus: float = 0  # CPUs the cluster can have at once (streamed training keeps some for Ray Data)
    accelerator: str = ""  # the selection actors' GPU kind, e.g. "H100" ("" on CPUs or where unknown)
    worker_slots: Optional[int] = None  # selection actors of this size the cluster can hold at once, --max-workers aside

    def streamed_trial_concurrency(self, workers_per_trial: int) -> int:
        """Trials at once when each runs `workers_per_trial` Train workers fed by Ray Data: at least
        one CPU stays free for reading, joining and decoding, or the trainers would wait forever."""
        by_cpu = int((self.max_cpus - 1) // max(self.cpus_per_trial * workers_per_trial, 1e-9))
        return max(1, min(self.trial_concurrency // workers_per_trial, by_cpu))

    def worker_request(self) -> dict:
        """Ray Data map_batches resource arguments of one selection actor.

        GPU actors give no num_cpus: Ray Data then reserves 1 CPU beside the GPU itself (asking
        both is flagged experimental).
        """
        if self.use_gpu:
            extra = {} if self.cpus_per_worker == 1 else {"num_cpus": self.cpus_per_worker}
            return {"num_gpus": self.gpus_per_worker, **extra}
        return {"num_cpus": self.cpus_per_worker}

    def trial_request(self) -> dict:
        """Tune resources of one trial. A trial that only drives a Ray Train trainer asks for none
        (its workers hold them): Tune needs a non-empty bundle, so it asks for 1 byte of memory —
        a fraction of a CPU would leave a node 0.99 CPU short of the 1-CPU tasks Ray Data runs."""
        if not self.cpus_per_trial and not self.gpus_per_trial:
            return {"cpu": 0, "memory": 1}
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}

    def torch_threads(self) -> int:
        """Intra-op threads for a CPU worker: the CPUs it was given (at least 1)."""
        return max(1, int(self.cpus_per_worker))

    def describe(self) -> str:
        dev = "GPU" if self.use_gpu else "CPU"
        kind = f" on {self.accelerator}" if self.accelerator else ""
        return (f"resources ({self.capacity}): selection on up to {self.select_workers} {dev} actor(s){kind} "
                f"of {{CPU {self.cpus_per_worker:g}, GPU {self.gpus_per_worker:g}}}; up to {self.trial_concurrency} "
                f"trial(s) at once of {{CPU {self.cpus_per_trial:g}, GPU {self.gpus_per_trial:g}}}"
                + (f"; overridden: {', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in self.overrides.items())}" if self.overrides else ""))

    def as_params(self) -> dict:
        return {f"resources.{k}": v for k, v in asdict(self).items() if k != "overrides"}


def _node_types_from_yaml(config: dict, path: str) -> Optional[Capacity]:
    types = config.get("available_node_types") or {}
    if not types:
        return None
    cap = int(config.get("max_workers", 10**9))
    head = config.get("head_node_type")
    found = []
    for name, t in types.items():
        res = t.get("resources") or {}
        count = 1 if name == head else min(int(t.get("max_workers", 0)), cap)
        if count > 0:
            found.append(_node_type(name, res, count))
    return Capacity(tuple(found), f"autoscaler config {path}")


def _gcs_cluster_config() -> Optional[Capacity]:
    read = getattr(getattr(ray._private.state, "state", None), "get_cluster_config", None)
    if read is None:  # a Ray without the call: the autoscaler's file is the next source
        return None
    try:
        config = read()  # None where no autoscaler reported node types
    except Exception as e:  # a GCS that fails to answer: planning from the nodes up now could miss every GPU
        raise ConfigError(f"could not read the autoscaler's node types from the cluster's GCS ({type(e).__name__}: {e}); "
                          "without them the plan would have only the nodes up now (no GPU on a cluster that has not "
                          "scaled up yet): check the head node (`ray status`) and rerun") from e
    if config is None or not config.node_group_configs:
        return None
    found = []
    for g in config.node_group_configs:
        count = g.max_count if g.max_count >= 0 else 10**6
        if count > 0:
            found.append(_node_type(g.name, g.resources, count))
    return Capacity(tuple(found), "autoscaler node types (GCS)") if found else None


def _monitor_config_paths(gcs_address: str) -> list[str]:
    """--autoscaling-config of the autoscaler monitor serving this GCS (Linux /proc; empty elsewhere)."""
    paths = []
    port = gcs_address.rsplit(":", 1)[-1]
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") or "autoscaler" in a and "monitor" in a for a in args[:3]):
            continue
        gcs = [a.split("=", 1)[1] for a in args if a.startswith("--gcs-address=")]
        if gcs and not gcs[0].endswith(f":{port}"):
            continue  # another cluster's autoscaler on this machine
        paths += [os.path.expanduser(a.split("=", 1)[1]) for a in args if a.startswith("--autoscaling-config=")]
    return paths


def _autoscaler_file_config(monitor_paths: list[str]) -> Optional[Capacity]:
    """Node types from the monitor's --autoscaling-config files, else ~/ray_bootstrap_config.yaml."""
    import yaml

    for path in monitor_paths + [os.path.expanduser("~/ray_bootstrap_config.yaml")]:
        if os.path.isfile(path):
            with open(path) as f:
                found = _node_types_from_yaml(yaml.safe_load(f) or {}, path)
            if found is not None:
                return found
    return None


def _alive_nodes() -> Capacity:
    types = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            types.append(_node_type(n.get("NodeManagerAddress", "node"), r, 1))
    return Capacity(tuple(types), "nodes alive now (no autoscaler)")


def discover_capacity() -> Capacity:
    """The connected cluster's capacity (see the module docstring for the order). Refuses, naming
    the file, where an autoscaler serves this cluster but its node types cannot be read."""
    found = _gcs_cluster_config()
    if found is not None:
        return found
    named = _monitor_config_paths(ray.get_runtime_context().gcs_address)  # one scan of /proc
    found = _autoscaler_file_config(named)
    if found is not None:
        return found
    if named:
        what = "a config without available_node_types" if os.path.isfile(named[0]) else "not a file on this node"
        raise ConfigError(f"this cluster's autoscaler reads {named[0]}, {what}: planned from the nodes up now, the run could "
                          "miss every GPU; run the driver on the head node (`ray job submit`) or fix that file")
    return _alive_nodes()


def local_capacity() -> Capacity:
    """This machine as the local Ray would count it (CPUs within the cgroup, visible NVIDIA GPUs
    and their kind, from NVML: no CUDA context), without starting Ray."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    gpu = get_accelerator_manager_for_resource("GPU")
    n, visible = gpu.get_current_node_num_accelerators(), gpu.get_current_process_visible_accelerator_ids()
    n = n if visible is None else min(n, len(visible))
    kind = (gpu.get_current_node_accelerator_type() or "") if n else ""
    return Capacity((NodeType("local", float(get_num_cpus()), float(n), 1, kind),), "this machine; its Ray starts once the plan is accepted")


def find_capacity(address: Optional[str] = None) -> Capacity:
    """The capacity a run plans from, starting no Ray node: the Ray already running here, or the
    cluster at `address` (or $RAY_ADDRESS), joined as a driver that schedules nothing; else this
    machine, whose local Ray starts only once the plan is accepted (`ensure_ray`)."""
    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        return local_capacity()
    ensure_ray(address)
    return discover_capacity()


def plan_resources(capacity: Capacity, flags: ResourceFlags = ResourceFlags()) -> ResourcePlan:
    """Resources of every stage, from the cluster's capacity and the user's overrides."""
    overrides = {k: v for k, v in asdict(flags).items() if v is not None}
    use_gpu = capacity.max_gpus > 0 if flags.gpus_per_worker is None else flags.gpus_per_worker > 0
    if use_gpu:
        gpw = flags.gpus_per_worker if flags.gpus_per_worker else 1.0
        cpw = flags.cpus_per_worker if flags.cpus_per_worker is not None else 1.0
        gpt = flags.gpus_per_trial if flags.gpus_per_trial is not None else 1.0
        cpt = 1.0
    else:
        gpw, gpt = 0.0, 0.0
        cpw = flags.cpus_per_worker if flags.cpus_per_worker else 1.0
        cpt = cpw
    workers = capacity.slots(cpw, gpw)
    trials = capacity.slots(cpt, gpt)
    if use_gpu and capacity.max_gpus == 0:
        raise ConfigError(f"--gpus-per-worker {gpw:g} asks for GPUs, but this cluster can never have any ({capacity.source}): "
                         "drop the flag, or add a GPU node type")
    if workers < 1 or trials < 1:
        raise ConfigError(f"no node of this cluster ({capacity.source}) fits one worker of {{CPU {cpw:g}, GPU {gpw:g}}} "
                         f"or one trial of {{CPU {cpt:g}, GPU {gpt:g}}}: lower --cpus-per-worker / --gpus-per-trial")
    slots = workers
    if flags.max_workers is not None:
        workers, trials = min(workers, flags.max_workers), min(trials, flags.max_workers)
    return ResourcePlan(use_gpu, workers, cpw, gpw, trials, cpt, gpt, _describe_capacity(capacity), overrides, capacity.max_cpus,
                        capacity.accelerator if use_gpu else "", slots)


def _describe_capacity(c: Capacity) -> str:
    parts = [f"{t.name} {t.max_count}×{{CPU {t.cpus:g}, GPU {t.gpus:g}}}" for t in c.node_types if t.cpus or t.gpus]
    return f"{c.source}: " + (", ".join(parts) if parts else "no CPU or GPU")


# Ray defaults that cost a small run most of its CPU time, set for every process of the run's Ray job.
RAY_SETTINGS = {
    # Ray Data's default Parquet reader (V2) reads a dataset's footers on a pool of 32 new actors per
    # read (a process start each, ~1.5 CPU-s on 2 cores); one actor reads with 128 concurrent I/Os,
    # local or s3://: the store's thousands of shard footers in about a second. Small reads take the
    # V1 reader, which starts none (images.read_parquet).
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # Ray Train's controller polls its workers every 2 s by default: a finished trial waits up to
    # that long for the poll that ends it (teardown 3.4-4.7 s at 2 s, 0.8 s at 0.2 s on 2 cores).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
LOCAL_RAY_SETTINGS = {
    # one actor per Train run that watches for a node being drained (spot preemption): one machine
    # is never drained, and the actor's start costs ~1.5 CPU-s per trial
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray ends a worker process idle for over 1 s while more than num_cpus are up, and starts a new
    # one for the next task, which imports Ray Data and the run's modules again, stage after stage.
    # A run has this Ray to itself: its idle workers wait a minute (BENCHMARKS.md, "Where a small
    # streamed run's CPU goes": without it a small run took ~10% longer).
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
}


def job_env(settings: Mapping[str, str]) -> Optional[dict]:
    """Puts the settings the user has not set into this process's environment (the driver runs Ray
    Data reads too, and the embedded Ray's processes inherit it) and returns them as a runtime_env
    for ray.init, which gives them to every worker of a cluster's job.

    A variable set in the user's environment, or in the runtime_env of `ray job submit` (whose
    variables the driver runs with, and which Ray refuses to see set again), is left as it is.
    Variables set here for an earlier Ray of this process and not in `settings` are taken back: the
    embedded Ray's settings do not reach a cluster joined later (Ray Train passes the driver's
    RAY_TRAIN_* variables on to its controller)."""
    for k in _SET_HERE - settings.keys():
        os.environ.pop(k, None)
    _SET_HERE.intersection_update(settings)
    unset = {k: v for k, v in settings.items() if k not in os.environ or k in _SET_HERE}
    os.environ.update(unset)
    _SET_HERE.update(unset)
    return {"env_vars": unset} if unset else None


_SET_HERE: set[str] = set()  # variables job_env put into this process's environment (not the user's)


def ray_init_local(num_cpus: Optional[int] = None) -> None:
    """Start the embedded local Ray, reachable from this machine only: every server on loopback.

    Ray maps a requested node IP of 127.0.0.1 to the machine's external address, and then binds its
    gRPC servers to all interfaces. Its single-machine mode (what it runs on macOS and Windows) uses
    the loopback address and binds only there: it is selected by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    read when ray is imported, so the variable is set for the processes Ray starts and the constant
    for this one. No dashboard; Ray's default token auth stays on.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    from overinterp.pipeline import terminal

    # Workers' own stdout/stderr reach the terminal with -v only (always in /tmp/ray/session_latest/logs);
    # their errors reach the driver as Ray errors either way.
    # address="local": always a new instance of our own. With no address, ray.init() joins the last
    # cluster `ray start` announced on this machine (its ray_current_cluster file): someone else's
    # Ray, its resources and its users, which only an address the user gives may reach.
    # The settings go into this process's environment, which the embedded Ray's processes inherit; a
    # job runtime_env would add nothing, and the worker processes Ray starts ahead for the first job
    # have none, so they would idle beside the ones started for the job (~1.2 CPU-s each).
    job_env({**RAY_SETTINGS, **LOCAL_RAY_SETTINGS})
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=terminal.VERBOSE)


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start
    the embedded local Ray once."""
    from overinterp.pipeline import terminal

    if not ray.is_initialized():
        terminal.configure(terminal.VERBOSE)  # environment for Ray's processes, before they start
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True, runtime_env=job_env(RAY_SETTINGS))
        else:
            ray_init_local(num_cpus)
    terminal.quiet_ray_data()


_WATCHING_PARENT = False


def exit_with_parent(poll_s: float = 2.0) -> None:
    """In a Ray worker: exit once the process that started it (its node's raylet) is gone. A local
    Ray dies with a SIGKILLed driver, and a worker busy in a batch then can miss its raylet's end
    and sleep on as an orphan. Checked every poll_s seconds from a daemon thread; once per process.
    An exit mid-batch loses only that batch: shards are written whole or not at all."""
    global _WATCHING_PARENT
    parent = os.getppid()
    # only in a process its raylet started (Ray sets RAY_RAYLET_PID there): never in a driver, which a
    # closed terminal may orphan on purpose (nohup)
    if _WATCHING_PARENT or str(parent) != os.environ.get("RAY_RAYLET_PID"):
        return
    _WATCHING_PARENT = True

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is adopted by init (or a subreaper): its parent id changes
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-raylet").start()


def worker_device():
    """The device of a Ray task or actor: its assigned GPU, else the CPU.

    Ray 2.60 no longer hides GPUs from tasks that ask for none, so torch.cuda.is_available() alone
    would send every zero-GPU trial on a GPU node to cuda:0.
    """
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")
