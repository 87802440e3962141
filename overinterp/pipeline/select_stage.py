"""Selection on Ray Data: images are split across actors that explain them and write Parquet shards;
the random baseline is written by the driver (it needs no model).

One pool of actors serves every job of a run (a job: a model, a selector and a split), so the actors
start once (seconds each: a process, torch's import): an in-memory run hands out every job's images
in one dataset, a streamed run's pass is the union of its jobs' reads (a split is read once per job,
never held). Each actor loads a job's model on its first batch of that job, on its assigned GPU, or on CPU where it was given none. The pool grows to
the planned size as the autoscaler adds nodes. A worker lost with its node fails the pass, and the
stage selects the images not yet stored again (select_stream); shards are named by their content
(overinterp/store/format.py), so a batch done twice rewrites its own shard and every image ends up
in the store once. A rerun selects only the image ids not yet in the store.

Progress is shown in planned passes, from inside a batch too: the engines call on_passes as they
go, each actor forwards its running total every FORWARD_EVERY s to the run's PassCounter actor
(pipeline/pass_counter.py: one for all of a run's passes, since an actor start costs seconds of
CPU), and a driver thread shows, every POLL_EVERY s, the larger of that total and the passes of
the batches whose results have arrived.
Both are needed: Ray Data hands the driver an actor task's results when the task ends, and at
ImageNet's count one task is hundreds of batches (minutes of work).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import warnings
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from overinterp import fs, store
from overinterp.config import RunConfig
from overinterp.costplan import format_duration, format_rate
from overinterp.data import normalize
from overinterp.pipeline.pass_counter import run_pass_counter
from overinterp.pipeline.plan import SelectionJob, SelectionSource
from overinterp.progress import Progress
from overinterp.pipeline.resources import ResourcePlan, exit_with_parent, worker_device
from overinterp.selection import RANDOM, EngineConfig, params_json, run_selector, selector_tag


class SelectionWorker:
    """Ray Data actor: (job, image_id, label, image) batches in, Parquet shards out. One pool serves
    every job of a pass (a job: a source model, selector and split), so a run starts its actors once
    for all of them: each actor start costs seconds (a process, torch's import, the models).

    jobs: one dict per job, {source: SelectionSource as a dict, split, selector, params, pass_scale};
    rows name theirs by index in the `job` column (absent: job 0). Models are loaded on first use."""

    def __init__(self, jobs: list[dict], root: str, mean, std, engine: dict, threads: int, counter=None, pass_id: str = ""):
        exit_with_parent()
        torch.set_num_threads(threads)
        # passes made go to the driver's PassCounter (if any), at most every FORWARD_EVERY s; per job, for its scale
        self.passes = [PassForwarder(counter, pass_id, scale=job["pass_scale"]) if counter is not None else None for job in jobs]
        self.device = worker_device()
        self.jobs, self.models = jobs, {}  # models: {source tag: model on self.device}
        self.root = root
        self.mean, self.std = tuple(mean), tuple(std)
        self.engine = EngineConfig(**engine)

    def model(self, source: dict):
        if source["tag"] not in self.models:
            self.models[source["tag"]] = SelectionSource(**source).load(self.device)
        return self.models[source["tag"]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Selects and stores a batch; returns what the driver counts, not a row per image: per job in
        the batch one row (images: how many were selected, seconds: the worker's time on them) and a
        row per image that did not decode (its path and reason). Ray Data hands the driver a task's
        results when the task ends, hundreds of calls at once at ImageNet's count: rows per image made
        the driver map their object-store pages and convert them to ~200 MiB of Python strings at its
        peak; a few bytes a call stay small however many arrive."""
        n_in = len(batch["image_id"])
        job = np.asarray(batch["job"]) if "job" in batch else np.zeros(n_in, dtype=np.int64)
        parts = [self._select(int(j), {k: np.asarray(v)[job == j] for k, v in batch.items()}) for j in np.unique(job)]
        if not parts:
            return _counts(0, 0, 0.0, np.array([], dtype=object), np.array([], dtype=object))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _select(self, j: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        job = self.jobs[j]
        n_in = len(batch["image_id"])
        errors = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n_in, "", dtype=object)
        good = errors == ""  # undecodable files arrive as rows with a reason: recorded by the driver, never selected
        paths = np.asarray(batch["path"], dtype=object) if "path" in batch else np.full(n_in, "", dtype=object)
        bad = {"path": paths[~good], "error": errors[~good]}
        if not good.any():
            return _counts(j, 0, 0.0, **bad)
        batch = {k: v[good] for k, v in batch.items() if k in ("image_id", "label", "image")}
        images = torch.from_numpy(np.array(batch["image"])).to(self.device)  # (B, C, H, W) uint8
        x = normalize(images, self.mean, self.std)
        res = run_selector(job["selector"], self.model(job["source"]), x, job["params"], self.engine, on_passes=self.passes[j]).cpu()
        _, _, H, W = images.shape
        n = len(batch["image_id"])
        store.write_rows(
            self.root,
            model=job["source"]["tag"],
            selector=selector_tag(job["selector"], job["params"]),
            selector_params=params_json(job["params"]),
            split=job["split"],
            image_id=batch["image_id"],
            label=batch["label"],
            pred=res.pred.numpy(),
            confidence=res.confidence.numpy(),
            order=res.order,
            step_sizes=res.step_sizes,
            curve=res.curve,
            forward_passes=res.forward_passes // max(1, n),
            height=H,
            width=W,
        )
        return _counts(j, n, time.perf_counter() - t0, **bad)


def _counts(job: int, images: int, seconds: float, path: np.ndarray, error: np.ndarray) -> dict[str, np.ndarray]:
    """A selection call's rows for the driver, all of one job: (images, seconds) of the call, then
    (path, error) of each image that did not decode, with images and seconds 0."""
    n_bad = len(path)
    return {"job": np.full(1 + n_bad, job, dtype=np.int64), "images": np.array([images] + [0] * n_bad, dtype=np.int64),
            "seconds": np.array([seconds] + [0.0] * n_bad), "path": np.array([""] + list(path), dtype=object),
            "error": np.array([""] + list(error), dtype=object)}


FORWARD_EVERY = 2.0  # seconds between a worker's reports of the passes it has made
POLL_EVERY = 2.0  # seconds between the driver's reads of those reports


class PassForwarder:
    """A worker's on_passes callback: adds up the engine's counts and sends them to a PassCounter at
    most every `interval` seconds (one small remote call, never waited on), across batches.

    scale: planned units per forward pass (bgsis: a backward pass counts BACKWARD_COST, and the
    engine reports forward passes only). What is still pending when the pass ends is never sent:
    the driver counts those batches from their results.
    """

    def __init__(self, counter, pass_id: str = "", scale: float = 1.0, interval: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.counter, self.pass_id, self.scale, self.clock = counter, pass_id, scale, clock
        self.interval = FORWARD_EVERY if interval is None else interval
        self.key = uuid.uuid4().hex  # this worker, in the counter
        self.pending = 0
        self.last = clock()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.counter.add.remote(self.pass_id, self.key, self.pending * self.scale)
            self.pending, self.last = 0, now


def watch_progress(bar: Progress, finished: Callable[[], float], reported: Callable[[], float], stop: threading.Event,
                   interval: Optional[float] = None, on_progress: Optional[Callable[[float], bool]] = None) -> None:
    """Until `stop` is set: every `interval` s (None: POLL_EVERY, read at the call, so tests can
    shorten it) move the bar on to the larger of finished() (the passes of the batches whose results
    arrived) and reported() (the workers' running total, see PassCounter). Run in a driver thread.
    on_progress(passes so far) is called after each move until it returns True."""
    interval = POLL_EVERY if interval is None else interval
    while not stop.wait(interval):
        done = finished()
        try:
            done = max(done, reported())
        except Exception:  # noqa: BLE001 — progress only: a counter lost with the pass must not hide its real error
            continue
        bar.update_to(int(done))
        if on_progress is not None and on_progress(done):
            on_progress = None


def selection_engine(cfg: RunConfig, resources: ResourcePlan) -> EngineConfig:
    """The run's --compile and --autocast for its selection actors, in either backend; autocast on
    GPUs only (the driver says so when a run asks for it without them)."""
    return EngineConfig(compile=cfg.compile, autocast=cfg.autocast if resources.use_gpu else None)


def select_in_memory(jobs: list[SelectionJob], images: dict[str, np.ndarray], labels: dict[str, np.ndarray], mean, std, root: str,
                     resources: ResourcePlan, engine: EngineConfig = EngineConfig(), select_batch: int = 64) -> list[int]:
    """Run selection jobs on in-memory images ({split: (N, C, H, W) uint8}, ids 0..N-1), all through
    one pool of actors, each job on its split's images not yet in the store. Returns the images
    selected now, per job."""

    def todo(done: list[np.ndarray]) -> Optional[ray.data.Dataset]:
        items = [{"job": j, "image_id": i, "label": int(labels[job.split][i]), "image": images[job.split][i]}
                 for j, job in enumerate(jobs) for i in np.setdiff1d(np.arange(len(labels[job.split])), done[j]).tolist()]
        return ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / select_batch)) if items else None

    hw = next(iter(images.values())).shape[2:]
    selected, _ = select_stream(jobs, todo, root, mean, std, resources, engine, select_batch,
                                totals=[len(labels[job.split]) for job in jobs], hw=hw, eager=True)
    return selected


def select_stream(
    jobs: list[SelectionJob],
    todo: Callable[[list[np.ndarray]], Optional[ray.data.Dataset]],
    root: str,
    mean,
    std,
    resources: ResourcePlan,
    engine: EngineConfig = EngineConfig(),
    select_batch: int = 64,
    *,
    totals: list[int],
    hw: Optional[tuple[int, int]] = None,
    eager: bool = False,
) -> tuple[list[int], list[list[tuple[str, str]]]]:
    """Run model selectors over Datasets of {image_id, label, image[, path, error]} rows, all jobs
    through one pool of actors (SelectionWorker).

    todo(done): the Dataset of the images still to select, given the ids already in the store (per
    job, sorted: store.done_ids), with a `job` column (the index into jobs) where there are several
    jobs; None when nothing is left. totals: images per job. Progress is shown in
    forward passes done out of planned (hw given and every selector has a pass formula), else in
    images. Returns, per job, (images selected now, (path, reason) of the rows that failed to decode).

    Lost workers. Ray Data's actors are created with max_restarts=0: Ray does not restart an actor
    whose node or process died. (Ray Data passes each actor its map function as an object-store
    reference; Ray warns — the `E ... core_worker.cc` line of ray-project/ray#53727 — that a
    restarted actor cannot be rebuilt if that object is lost. Here the driver owns it, so the warning
    is a false alarm, but restarts are not needed either.) Instead, a batch lost with its worker
    fails the pass, and this function runs the selection again on the images not yet in the store:
    shards are written per batch and atomically under content names, so nothing finished is redone.
    Lost passes are counted, and a lost pass that stored images starts the count again at 1: the
    selection gives up at SELECTION_ATTEMPTS, so a long selection on a cluster goes on through losses
    that come now and then. An actor of the failed pass that was still writing when
    the next pass read the stored ids can store an image that pass selects again; so a selection
    that needed a second pass ends with store.repair_selection, which keeps one row per image
    (backward selection is deterministic: the repeats are identical) and says what it did.
    """
    attempt, in_a_row = 0, 0  # in_a_row: lost passes in a row since the last one that stored images
    done = [store.done_ids(root, job.source.tag, job.tag, job.split) for job in jobs]
    while True:
        attempt += 1
        for job, stored, total in zip(jobs, done, totals):
            print(f"{_label(job)} {len(stored)} of {total} images already selected; {total - len(stored)} to go", flush=True)
        ds = todo(done)
        if ds is None:
            return [0] * len(jobs), [[] for _ in jobs]
        try:
            selected, skipped = _select_pass(jobs, ds, root, mean, std, resources, engine, select_batch, totals, done, hw, eager)
            if attempt > 1:
                for job in jobs:
                    for action in store.repair_selection(root, job.source.tag, job.tag, job.split):
                        print(f"{_label(job)} after the lost worker: {action}", flush=True)
            return selected, [sorted(s) for s in skipped]
        except Exception as e:
            if not lost_worker(e):
                raise
            before, done = sum(map(len, done)), [store.done_ids(root, job.source.tag, job.tag, job.split) for job in jobs]
            in_a_row = 1 if sum(map(len, done)) > before else in_a_row + 1
            if in_a_row >= SELECTION_ATTEMPTS:
                raise
            print(f"{_label(*jobs)} a selection worker was lost ({type(lost_worker(e)).__name__}); "
                  f"selecting the images not yet stored again (attempt {in_a_row + 1} of {SELECTION_ATTEMPTS}; a pass that "
                  "stores images starts the count again)", flush=True)


SELECTION_ATTEMPTS = 3  # lost passes in a row (the first may have stored images, the others not) that end a selection


def _label(*jobs: SelectionJob) -> str:
    """How the output names a job, or several: [<selector tag> <model>/<split>, ...]."""
    return "[" + ", ".join(f"{job.tag} {job.source.tag}/{job.split}" for job in jobs) + "]"


def lost_worker(e: BaseException) -> Optional[BaseException]:
    """The error in e's chain that says a worker process or node died (Ray wraps it), else None."""
    lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
    return next((c for c in fs.causes(e) if isinstance(c, lost)), None)


def _select_pass(jobs, ds, root, mean, std, resources, engine, select_batch, totals, done, hw, eager):
    n_todo = [total - len(stored) for stored, total in zip(done, totals)]
    workers = min(resources.select_workers, max(1, math.ceil(sum(n_todo) / select_batch)))
    per_image = [_planned_passes(job, hw) for job in jobs]
    in_passes = all(per_image)
    unit, scale = ("passes", per_image) if in_passes else ("images", [1] * len(jobs))
    counter, pass_id = (run_pass_counter() if in_passes else None), uuid.uuid4().hex
    pass_scale = [p / max(1, _planned_passes(job, hw, forward_only=True)) if in_passes else 1.0 for job, p in zip(jobs, per_image)]
    ds = map_on_actors(ds, SelectionWorker, resources, workers, select_batch,
                       # in-memory inputs need no CPU to read: ask for every planned actor at once, so an autoscaler starts
                       # their nodes together. Streamed inputs are read by CPU tasks: grow from one actor, or the actors
                       # could hold every CPU the readers need (a deadlock on a small cluster).
                       initial_size=workers if eager else 1,
                       jobs=[dict(source=asdict(job.source), split=job.split, selector=job.selector, params=job.params, pass_scale=scale)
                             for job, scale in zip(jobs, pass_scale)],
                       root=root, mean=mean, std=std, engine=asdict(engine), threads=resources.torch_threads(), counter=counter,
                       pass_id=pass_id)
    n, skipped, worker_s, t0 = [0] * len(jobs), [[] for _ in jobs], [0.0] * len(jobs), time.monotonic()
    planned = sum(k * c for k, c in zip(n_todo, scale))
    label = f"selection {jobs[0].tag} {jobs[0].source.tag}/{jobs[0].split}" + (f" and {len(jobs) - 1} more" if len(jobs) > 1 else "")
    bar = Progress(planned, unit, label, steady=True)  # the ETA leaves the actors' start out

    def finished() -> float:
        return sum(k * c for k, c in zip(n, scale))

    stop = threading.Event()
    watcher = None
    if counter is not None:
        first: list = []  # (passes, time) when progress was first seen: the rate is measured from there, after start-up

        def replan(passes: float) -> bool:
            now = time.monotonic()
            if passes <= 0:
                return False
            if not first:
                first.append((passes, now))
                return False
            if passes <= first[0][0] or passes < REPLAN_AT * planned:
                return False
            print(_replan_line(_label(*jobs), passes, passes - first[0][0], now - first[0][1], planned), flush=True)
            return True

        watcher = threading.Thread(target=watch_progress, daemon=True, name="selection-progress",
                                   args=(bar, finished, lambda: ray.get(counter.total.remote(pass_id), timeout=POLL_EVERY), stop),
                                   kwargs={"on_progress": replan})
        watcher.start()
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):  # SelectionWorker's counts (see _counts)
            for j, images, seconds, path, error in zip(out["job"], out["images"], out["seconds"], out["path"], out["error"]):
                n[j] += int(images)
                worker_s[j] += float(seconds)
                if error != "":
                    skipped[j].append((path, error))
            bar.update_to(finished())
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
            counter.forget.remote(pass_id)
        bar.close()
    wall = format_duration(time.monotonic() - t0)
    for job, n_job, s_job, p_job in zip(jobs, n, worker_s, per_image):
        if n_job:  # wall time of the whole pass beside the passes; per image: what one worker spent on it, start-up excluded
            per = f", {format_rate(p_job * n_job / s_job)} passes/s per worker" if p_job and s_job > 0 else ""
            print(f"{_label(job)} selected {n_job} images in {wall} wall{' (the pass)' if len(jobs) > 1 else ''}, "
                  f"{s_job / n_job:.3g} worker-s per image{per}", flush=True)
    return n, skipped


REPLAN_AT = 0.02  # the plan is made again once this fraction of a selection's passes is done


def _replan_line(label: str, passes: float, gained: float, seconds: float, total: float) -> str:
    """The plan again from the run itself: `passes` of `total` are done, and the last `gained` of
    them took `seconds` of wall time (measured from the first progress seen, so the actors' start is
    left out; reading and decoding are in), so the rest takes this long at that rate. The printed
    plan's ETA came from timing the model on the driver's CPU and the streaming constants of costplan."""
    rate = gained / max(seconds, 1e-9)
    return (f"{label} measured: {passes / total:.0%} of the passes done, {format_rate(rate)} passes/s "
            f"over the last {format_duration(seconds)}; at that rate the rest takes ≈ {format_duration((total - passes) / rate)}")


def map_on_actors(ds: ray.data.Dataset, worker: type, resources: ResourcePlan, workers: int, batch_size: int,
                  initial_size: int = 1, **worker_kwargs) -> ray.data.Dataset:
    """ds mapped in numpy batches by a pool of 1 to `workers` actors of `worker(**worker_kwargs)`, each
    with the plan's selection-worker resources. max_restarts=0: a lost actor is not rebuilt by Ray;
    its caller reruns the pass on what is not yet done (select_stream)."""
    with warnings.catch_warnings():  # max_restarts has no named parameter yet; Ray 2.60 flags every **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(worker, fn_constructor_kwargs=worker_kwargs, batch_size=batch_size, batch_format="numpy",
                              compute=ActorPoolStrategy(min_size=1, max_size=workers, initial_size=initial_size),
                              max_restarts=0, **resources.worker_request())


def _planned_passes(job: SelectionJob, hw: Optional[tuple[int, int]], forward_only: bool = False) -> Optional[int]:
    """Forward passes per image the selector plans (a backward pass counted as BACKWARD_COST unless
    forward_only), or None."""
    from overinterp.costplan import BACKWARD_COST
    from overinterp.selection import SELECTORS, planned_passes

    if hw is None or job.selector not in SELECTORS:
        return None
    fwd, bwd = planned_passes(job.selector, tuple(hw), job.params)
    return int(fwd) if forward_only else int(fwd + BACKWARD_COST * bwd)


def stored_random_ids(root: str, split: str, params: dict) -> np.ndarray:
    """Sorted ids of the images whose random baseline is stored (store.done_ids)."""
    return store.done_ids(root, "none", selector_tag(RANDOM, params), split)


def write_random(root: str, split: str, labels: np.ndarray, height: int, width: int, params: dict, select_batch: int,
                 image_ids: Optional[np.ndarray] = None, done: Optional[np.ndarray] = None) -> int:
    """The random baseline, stored like a selection (model "none"); its order is a function of
    (seed, split, image id), so rows hold no order and the reader regenerates it. Returns the rows written.

    image_ids: the ids of `labels`' images (default 0..N-1). done: the random baseline's stored ids
    (stored_random_ids), where the caller read them already; select_batch: rows per shard.
    """
    tag = selector_tag(RANDOM, params)
    ids_all = np.arange(len(labels), dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    done = stored_random_ids(root, split, params) if done is None else done
    todo = np.flatnonzero(~store.stored_mask(ids_all, done))  # positions
    for start in range(0, len(todo), select_batch):
        pos = todo[start : start + select_batch]
        store.write_rows(root, model="none", selector=tag, selector_params=params_json(params), split=split,
                         image_id=ids_all[pos], label=np.asarray(labels)[pos], height=height, width=width)
    return len(todo)
