"""Selection on Ray Data: images are split across actors that explain them and write Parquet shards;
the random baseline is written by the driver (it needs no model).

Each actor loads its model once (in __init__) on its assigned GPU, or on CPU where it was given none.
The pool grows to the planned size as the autoscaler adds nodes. A worker lost with its node fails
the pass, and the stage selects the images not yet stored again (select_stream); shards are named by
their content (overinterp/store.py), so a batch done twice rewrites its own shard and every image
ends up in the store once. A rerun selects only the image ids not yet in the store.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from typing import Optional

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from overinterp import store
from overinterp.data import normalize
from overinterp.pipeline.plan import SelectionJob, SelectionSource
from overinterp.progress import Progress
from overinterp.pipeline.resources import ResourcePlan, worker_device
from overinterp.selection import EngineConfig, params_json, run_selector, selector_tag


class SelectionWorker:
    """Ray Data actor: (image_id, label, image) batches in, Parquet shards out."""

    def __init__(self, source: dict, root: str, split: str, mean, std, selector: str, params: dict, engine: dict, threads: int,
                 skip_ids: Optional[np.ndarray] = None):
        torch.set_num_threads(threads)
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
        t0 = time.perf_counter()
        if self.skip_ids is not None:
            keep = ~np.isin(np.asarray(batch["image_id"]), self.skip_ids)
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n_in = len(batch["image_id"])
        if n_in == 0:
            return {"image_id": np.zeros(0, np.int64), "error": np.zeros(0, object), "path": np.zeros(0, object),
                    "node": np.zeros(0, object), "seconds": np.zeros(0)}
        errors = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n_in, "", dtype=object)
        paths = np.asarray(batch["path"], dtype=object) if "path" in batch else np.full(n_in, "", dtype=object)
        out = {"image_id": np.asarray(batch["image_id"]), "error": errors, "path": paths,
               "node": np.full(n_in, ray.get_runtime_context().get_node_id(), dtype=object)}
        good = errors == ""  # undecodable files arrive as rows with a reason: recorded by the driver, never selected
        if not good.any():
            return {**out, "seconds": np.zeros(n_in)}
        batch = {k: np.asarray(v)[good] for k, v in batch.items() if k in ("image_id", "label", "image")}
        images = torch.from_numpy(np.array(batch["image"])).to(self.device)  # (B, C, H, W) uint8
        x = normalize(images, self.mean, self.std)
        res = run_selector(self.selector, self.model, x, self.params, self.engine).cpu()
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
        return {**out, "seconds": np.full(n_in, (time.perf_counter() - t0) / n)}


def select_in_memory(job: SelectionJob, images: np.ndarray, labels: np.ndarray, mean, std, root: str, resources: ResourcePlan,
                     engine: EngineConfig = EngineConfig(), select_batch: int = 64) -> tuple[int, list]:
    """Run a selection job on in-memory images (ids 0..N-1) not yet in the store."""
    done = store.done_ids(root, job.source.tag, job.tag, job.split)
    todo = [i for i in range(len(labels)) if i not in done]
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
    done: Optional[set] = None,
    total: Optional[int] = None,
    hw: Optional[tuple[int, int]] = None,
    eager: bool = False,
) -> tuple[int, list[tuple[str, str]]]:
    """Run a model selector over a Dataset of {image_id, label, image[, path, error]} rows.

    Images whose id is already in the store are skipped. Progress is shown in forward passes done
    out of planned (hw given and the selector has a pass formula), else in images. Returns (images
    selected now, (path, reason) of the rows that failed to decode).

    Lost workers. Ray Data's actors are created with max_restarts=0: Ray does not restart an actor
    whose node or process died. (Ray Data passes each actor its map function as an object-store
    reference; Ray warns — the `E ... core_worker.cc` line of ray-project/ray#53727 — that a
    restarted actor cannot be rebuilt if that object is lost. Here the driver owns it, so the warning
    was a false alarm, but restarts are not needed either.) Instead, a batch lost with its worker
    fails the pass, and this function runs the selection again, up to SELECTION_ATTEMPTS times, on
    the images not yet in the store: shards are written per batch and atomically under content
    names, so nothing finished is redone and no image is stored twice.
    """
    n, skipped = 0, []
    prefiltered = done is not None  # the caller's ds already leaves out the images in `done`
    for attempt in range(1, SELECTION_ATTEMPTS + 1):
        if done is None or attempt > 1:
            done = store.done_ids(root, job.source.tag, job.tag, job.split)
        skip = None if (prefiltered and attempt == 1) or not done else np.array(sorted(done), dtype=np.int64)
        of = f" of {total}" if total is not None else ""
        print(f"[{job.tag} {job.source.tag}/{job.split}] {len(done)}{of} images already selected"
              + (f"; {total - len(done)} to go" if total is not None else ""), flush=True)
        if ds is None or (total is not None and len(done) >= total):
            return n, sorted(skipped)
        try:
            n_now, skipped_now = _select_pass(job, ds, root, mean, std, resources, engine, select_batch, total, done, hw, eager, skip)
            return n + n_now, sorted(skipped + skipped_now)
        except Exception as e:
            if attempt == SELECTION_ATTEMPTS or not lost_worker(e):
                raise
            print(f"[{job.tag} {job.source.tag}/{job.split}] a selection worker was lost ({type(lost_worker(e)).__name__}); "
                  f"selecting the images not yet stored again (attempt {attempt + 1} of {SELECTION_ATTEMPTS})", flush=True)
    return n, sorted(skipped)


SELECTION_ATTEMPTS = 3


def lost_worker(e: BaseException) -> Optional[BaseException]:
    """The error in e's chain that says a worker process or node died (Ray wraps it), else None."""
    lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, lost):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _select_pass(job, ds, root, mean, std, resources, engine, select_batch, total, done, hw, eager=False, skip=None):
    n_todo = (total - len(done)) if total is not None else None
    workers = resources.select_workers if n_todo is None else min(resources.select_workers, max(1, math.ceil(n_todo / select_batch)))
    with warnings.catch_warnings():  # max_restarts has no named parameter yet; Ray 2.60 flags every **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = _map_selection(job, ds, root, mean, std, resources, engine, select_batch, workers, eager, skip)
    per_image = _planned_passes(job, hw)
    unit, scale = ("passes", per_image) if per_image else ("images", 1)
    n, skipped = 0, []
    with Progress(None if n_todo is None else n_todo * scale, unit, f"selection {job.tag} {job.source.tag}/{job.split}") as bar:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            bad = out["error"] != ""
            n += int((~bad).sum())
            bar.update(int((~bad).sum()) * scale)
            skipped += list(zip(out["path"][bad].tolist(), out["error"][bad].tolist()))
    return n, skipped


def _map_selection(job, ds, root, mean, std, resources, engine, select_batch, workers, eager=False, skip=None):
    return ds.map_batches(
        SelectionWorker,
        fn_constructor_kwargs=dict(
            source=asdict(job.source), root=root, split=job.split, mean=mean, std=std, selector=job.selector,
            params=job.params, engine=asdict(engine), threads=resources.torch_threads(), skip_ids=skip,
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


def _planned_passes(job: SelectionJob, hw: Optional[tuple[int, int]]) -> Optional[int]:
    """Forward passes per image the selector plans (a backward pass counted as BACKWARD_COST), or None."""
    from overinterp.costplan import BACKWARD_COST
    from overinterp.selection.cost import PLANNED_SELECTORS, planned_passes

    if hw is None or job.selector not in PLANNED_SELECTORS:
        return None
    fwd, bwd = planned_passes(job.selector, tuple(hw), job.params)
    return int(fwd + BACKWARD_COST * bwd)


def write_random(root: str, split: str, labels: np.ndarray, height: int, width: int, params: dict, select_batch: int,
                 image_ids: Optional[np.ndarray] = None) -> int:
    """The random baseline, stored like a selection (model "none"); its order is a function of
    (seed, split, image id), so rows hold no order and the reader regenerates it.

    image_ids: the ids of `labels`' images (default 0..N-1).
    """
    tag = selector_tag("random", params)
    ids_all = np.arange(len(labels), dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    done = np.array(sorted(store.done_ids(root, "none", tag, split)), dtype=np.int64)
    todo = np.flatnonzero(~np.isin(ids_all, done))  # positions
    for start in range(0, len(todo), select_batch):
        pos = todo[start : start + select_batch]
        store.write_rows(root, model="none", selector=tag, selector_params=params_json(params), split=split,
                         image_id=ids_all[pos], label=np.asarray(labels)[pos], height=height, width=width)
    return len(todo)
