"""Selection on Ray Data: images are split across actors that explain them and write Parquet shards;
the random baseline is written by the driver (it needs no model).

Each actor loads its model once (in __init__) on its assigned GPU, or on CPU where it was given none.
The pool grows to the planned size as the autoscaler adds nodes. A worker lost with its node fails
the pass, and the stage selects the images not yet stored again (select_stream); shards are named by
their content (overinterp/store/format.py), so a batch done twice rewrites its own shard and every image
ends up in the store once. A rerun selects only the image ids not yet in the store.

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
from overinterp.costplan import format_duration, format_rate
from overinterp.data import normalize
from overinterp.pipeline.pass_counter import run_pass_counter
from overinterp.pipeline.plan import SelectionJob, SelectionSource
from overinterp.progress import Progress
from overinterp.pipeline.resources import ResourcePlan, exit_with_parent, worker_device
from overinterp.selection import RANDOM, EngineConfig, params_json, run_selector, selector_tag


class SelectionWorker:
    """Ray Data actor: (image_id, label, image) batches in, Parquet shards out."""

    def __init__(self, source: dict, root: str, split: str, mean, std, selector: str, params: dict, engine: dict, threads: int,
                 skip_ids: Optional[np.ndarray] = None, counter=None, pass_id: str = "", pass_scale: float = 1.0):
        exit_with_parent()
        torch.set_num_threads(threads)
        # passes made go to the driver's PassCounter (if any), at most every FORWARD_EVERY s
        self.passes = PassForwarder(counter, pass_id, scale=pass_scale) if counter is not None else None
        # (S,) sorted int64: ids already in the store, dropped here rather than by a Ray Data filter
        # task — that task would need a CPU, and on a node whose CPUs the actors hold it never runs
        self.skip_ids = skip_ids if skip_ids is not None and len(skip_ids) else None
        self.device = worker_device()
        self.model = SelectionSource(**source).load(self.device)
        self.tag, self.root, self.split = source["tag"], root, split
        self.mean, self.std = tuple(mean), tuple(std)
        self.selector, self.params = selector, params
        self.engine = EngineConfig(**engine)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Selects and stores a batch; returns what the driver counts, not a row per image: one row
        (images: how many were selected, seconds: the worker's time on them) and a row per image
        that did not decode (its path and reason). Ray Data hands the driver a task's results when
        the task ends, hundreds of calls at once at ImageNet's count: rows per image made the
        driver map their object-store pages and convert them to ~200 MiB of Python strings at its
        peak; a few bytes a call stay small however many arrive."""
        t0 = time.perf_counter()
        if self.skip_ids is not None:
            keep = ~store.stored_mask(batch["image_id"], self.skip_ids)
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n_in = len(batch["image_id"])
        errors = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n_in, "", dtype=object)
        good = errors == ""  # undecodable files arrive as rows with a reason: recorded by the driver, never selected
        paths = np.asarray(batch["path"], dtype=object) if "path" in batch else np.full(n_in, "", dtype=object)
        bad = {"path": paths[~good], "error": errors[~good]}
        if not good.any():
            return _counts(0, 0.0, **bad)
        batch = {k: np.asarray(v)[good] for k, v in batch.items() if k in ("image_id", "label", "image")}
        images = torch.from_numpy(np.array(batch["image"])).to(self.device)  # (B, C, H, W) uint8
        x = normalize(images, self.mean, self.std)
        res = run_selector(self.selector, self.model, x, self.params, self.engine, on_passes=self.passes).cpu()
        _, _, H, W = images.shape
        n = len(batch["image_id"])
        store.write_rows(
            self.root,
            model=self.tag,
            selector=selector_tag(self.selector, self.params),
            selector_params=params_json(self.params),
            split=self.split,
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
        return _counts(n, time.perf_counter() - t0, **bad)


def _counts(images: int, seconds: float, path: np.ndarray, error: np.ndarray) -> dict[str, np.ndarray]:
    """A selection call's rows for the driver: (images, seconds) of the call, then (path, error) of
    each image that did not decode, with images and seconds 0."""
    n_bad = len(path)
    return {"images": np.array([images] + [0] * n_bad, dtype=np.int64), "seconds": np.array([seconds] + [0.0] * n_bad),
            "path": np.array([""] + list(path), dtype=object), "error": np.array([""] + list(error), dtype=object)}


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
                   interval: float = POLL_EVERY, on_progress: Optional[Callable[[float], bool]] = None) -> None:
    """Until `stop` is set: every `interval` s move the bar on to the larger of finished() (the
    passes of the batches whose results arrived) and reported() (the workers' running total, see
    PassCounter). Run in a driver thread. on_progress(passes so far) is called after each move until
    it returns True."""
    while not stop.wait(interval):
        done = finished()
        try:
            done = max(done, reported())
        except Exception:  # noqa: BLE001 — progress only: a counter lost with the pass must not hide its real error
            continue
        bar.update_to(int(done))
        if on_progress is not None and on_progress(done):
            on_progress = None


def select_in_memory(job: SelectionJob, images: np.ndarray, labels: np.ndarray, mean, std, root: str, resources: ResourcePlan,
                     engine: EngineConfig = EngineConfig(), select_batch: int = 64) -> tuple[int, list]:
    """Run a selection job on in-memory images (ids 0..N-1) not yet in the store."""
    done = store.done_ids(root, job.source.tag, job.tag, job.split)
    todo = np.setdiff1d(np.arange(len(labels)), done).tolist()
    items = [{"image_id": i, "label": int(labels[i]), "image": images[i]} for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(todo) / select_batch))) if items else None
    return select_stream(job, ds, root, mean, std, resources, engine, select_batch, done=done, total=len(labels), hw=images.shape[2:],
                         eager=True)


def select_stream(
    job: SelectionJob,
    ds: Optional[ray.data.Dataset],
    root: str,
    mean,
    std,
    resources: ResourcePlan,
    engine: EngineConfig = EngineConfig(),
    select_batch: int = 64,
    done: Optional[np.ndarray] = None,
    total: Optional[int] = None,
    hw: Optional[tuple[int, int]] = None,
    eager: bool = False,
) -> tuple[int, list[tuple[str, str]]]:
    """Run a model selector over a Dataset of {image_id, label, image[, path, error]} rows.

    Images whose id is already in the store are skipped; done: those ids, sorted (store.done_ids),
    when the caller has left them out of ds already. Progress is shown in forward passes done
    out of planned (hw given and the selector has a pass formula), else in images. Returns (images
    selected now, (path, reason) of the rows that failed to decode).

    Lost workers. Ray Data's actors are created with max_restarts=0: Ray does not restart an actor
    whose node or process died. (Ray Data passes each actor its map function as an object-store
    reference; Ray warns — the `E ... core_worker.cc` line of ray-project/ray#53727 — that a
    restarted actor cannot be rebuilt if that object is lost. Here the driver owns it, so the warning
    was a false alarm, but restarts are not needed either.) Instead, a batch lost with its worker
    fails the pass, and this function runs the selection again on the images not yet in the store:
    shards are written per batch and atomically under content names, so nothing finished is redone.
    Lost passes are counted, and a lost pass that stored images starts the count again at 1: the
    selection gives up at SELECTION_ATTEMPTS, so a long selection on a cluster goes on through losses
    that come now and then. An actor of the failed pass that was still writing when
    the next pass read the stored ids can store an image that pass selects again; so a selection
    that needed a second pass ends with store.repair_selection, which keeps one row per image
    (backward selection is deterministic: the repeats are identical) and says what it did.
    """
    n, skipped = 0, []
    prefiltered = done is not None  # the caller's ds already leaves out the images in `done`
    attempt, in_a_row = 0, 0  # in_a_row: lost passes in a row since the last one that stored images
    while True:
        attempt += 1
        if done is None:
            done = store.done_ids(root, job.source.tag, job.tag, job.split)
        skip = None if (prefiltered and attempt == 1) or not len(done) else done
        of = f" of {total}" if total is not None else ""
        print(f"[{job.tag} {job.source.tag}/{job.split}] {len(done)}{of} images already selected"
              + (f"; {total - len(done)} to go" if total is not None else ""), flush=True)
        if ds is None or (total is not None and len(done) >= total):
            return n, sorted(skipped)
        try:
            n_now, skipped_now = _select_pass(job, ds, root, mean, std, resources, engine, select_batch, total, done, hw, eager, skip)
            if attempt > 1:
                for action in store.repair_selection(root, job.source.tag, job.tag, job.split):
                    print(f"[{job.tag} {job.source.tag}/{job.split}] after the lost worker: {action}", flush=True)
            return n + n_now, sorted(skipped + skipped_now)
        except Exception as e:
            if not lost_worker(e):
                raise
            before, done = len(done), store.done_ids(root, job.source.tag, job.tag, job.split)  # also the next pass's start
            in_a_row = 1 if len(done) > before else in_a_row + 1
            if in_a_row >= SELECTION_ATTEMPTS:
                raise
            print(f"[{job.tag} {job.source.tag}/{job.split}] a selection worker was lost ({type(lost_worker(e)).__name__}); "
                  f"selecting the images not yet stored again (attempt {in_a_row + 1} of {SELECTION_ATTEMPTS}; a pass that "
                  "stores images starts the count again)", flush=True)


SELECTION_ATTEMPTS = 3  # lost passes in a row (the first may have stored images, the others not) that end a selection


def lost_worker(e: BaseException) -> Optional[BaseException]:
    """The error in e's chain that says a worker process or node died (Ray wraps it), else None."""
    lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
    return next((c for c in fs.causes(e) if isinstance(c, lost)), None)


def _select_pass(job, ds, root, mean, std, resources, engine, select_batch, total, done, hw, eager=False, skip=None):
    n_todo = (total - len(done)) if total is not None else None
    workers = resources.select_workers if n_todo is None else min(resources.select_workers, max(1, math.ceil(n_todo / select_batch)))
    per_image = _planned_passes(job, hw)
    unit, scale = ("passes", per_image) if per_image else ("images", 1)
    counter, pass_id = (run_pass_counter() if per_image else None), uuid.uuid4().hex
    pass_scale = per_image / max(1, _planned_passes(job, hw, forward_only=True)) if per_image else 1.0
    with warnings.catch_warnings():  # max_restarts has no named parameter yet; Ray 2.60 flags every **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = _map_selection(job, ds, root, mean, std, resources, engine, select_batch, workers, eager, skip, counter, pass_id, pass_scale)
    n, skipped, worker_s, t0 = 0, [], 0.0, time.monotonic()
    bar = Progress(None if n_todo is None else n_todo * scale, unit, f"selection {job.tag} {job.source.tag}/{job.split}",
                   steady=True)  # the ETA leaves the actors' start out
    stop = threading.Event()
    watcher = None
    if counter is not None:
        first: list = []  # (passes, time) when progress was first seen: the rate is measured from there, after start-up

        def replan(passes: float) -> bool:
            now = time.monotonic()
            if n_todo is None or passes <= 0:
                return False
            if not first:
                first.append((passes, now))
                return False
            if passes <= first[0][0] or passes < REPLAN_AT * n_todo * per_image:
                return False
            print(_replan_line(job, passes, passes - first[0][0], now - first[0][1], n_todo * per_image), flush=True)
            return True

        watcher = threading.Thread(target=watch_progress, daemon=True, name="selection-progress",
                                   args=(bar, lambda: n * scale, lambda: ray.get(counter.total.remote(pass_id), timeout=POLL_EVERY), stop),
                                   kwargs={"on_progress": replan})
        watcher.start()
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):  # SelectionWorker's counts (see _counts)
            bad = out["error"] != ""
            n += int(out["images"].sum())
            bar.update_to(n * scale)
            worker_s += float(out["seconds"].sum())
            skipped += list(zip(out["path"][bad].tolist(), out["error"][bad].tolist()))
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
            counter.forget.remote(pass_id)
        bar.close()
    if n:  # wall time beside the passes; per image: what one worker spent on it, start-up excluded
        per = f", {format_rate(per_image * n / worker_s)} passes/s per worker" if per_image and worker_s > 0 else ""
        print(f"[{job.tag} {job.source.tag}/{job.split}] selected {n} images in {format_duration(time.monotonic() - t0)} wall, "
              f"{worker_s / n:.3g} worker-s per image{per}", flush=True)
    return n, skipped


REPLAN_AT = 0.02  # the plan is made again once this fraction of a selection's passes is done


def _replan_line(job, passes: float, gained: float, seconds: float, total: float) -> str:
    """The plan again from the run itself: `passes` of `total` are done, and the last `gained` of
    them took `seconds` of wall time (measured from the first progress seen, so the actors' start is
    left out; reading and decoding are in), so the rest takes this long at that rate. The printed
    plan's ETA came from timing the model on the driver's CPU and the streaming constants of costplan."""
    rate = gained / max(seconds, 1e-9)
    return (f"[{job.tag} {job.source.tag}/{job.split}] measured: {passes / total:.0%} of the passes done, {format_rate(rate)} passes/s "
            f"over the last {format_duration(seconds)}; at that rate the rest takes ≈ {format_duration((total - passes) / rate)}")


def _map_selection(job, ds, root, mean, std, resources, engine, select_batch, workers, eager=False, skip=None, counter=None,
                   pass_id="", pass_scale=1.0):
    return ds.map_batches(
        SelectionWorker,
        fn_constructor_kwargs=dict(
            source=asdict(job.source), root=root, split=job.split, mean=mean, std=std, selector=job.selector,
            params=job.params, engine=asdict(engine), threads=resources.torch_threads(), skip_ids=skip,
            counter=counter, pass_id=pass_id, pass_scale=pass_scale,
        ),
        batch_size=select_batch,
        batch_format="numpy",
        # in-memory inputs need no CPU to read: ask for every planned actor at once, so an autoscaler starts
        # their nodes together. Streamed inputs are read by CPU tasks: grow from one actor, or the actors
        # could hold every CPU the readers need (a deadlock on a small cluster).
        compute=ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers if eager else 1),
        max_restarts=0,  # a lost actor is not rebuilt by Ray; select_stream selects its images again (see there)
        **resources.worker_request(),
    )


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
