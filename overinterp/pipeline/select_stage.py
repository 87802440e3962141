"""Selection on Ray Data: images are split across actors that run backward selection and write
Parquet shards; the random baseline is written by the driver (it needs no model).

Each actor loads its model once (in __init__) on its GPU, or on CPU where the cluster has none.
Shards are written by the actor as soon as a batch is done, so an interrupted stage loses at most
the batches in flight; a rerun selects only the image ids not yet in the store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from overinterp import store
from overinterp.data import normalize
from overinterp.models import create_model, load_ensemble
from overinterp.pipeline.resources import Resources
from overinterp.selection import EngineConfig, params_json, run_selector, selector_tag


@dataclass(frozen=True)
class SelectionSource:
    """A model to explain: one checkpoint, several averaged as a MeanEnsemble, or a registered
    model built by name (e.g. a torchvision model with its weights)."""

    tag: str  # the store's model name, e.g. digits_cnn-s0, digits_cnn-ens3, tv_resnet50
    checkpoints: tuple[str, ...] = ()
    model: Optional[dict] = None  # create_model kwargs: name, num_classes, weights

    def load(self, device) -> torch.nn.Module:
        if self.checkpoints:
            return load_ensemble(list(self.checkpoints), device)
        return create_model(**self.model).to(device).eval()


class SelectionWorker:
    """Ray Data actor: (image_id, label, image) batches in, Parquet shards out."""

    def __init__(self, source: dict, root: str, split: str, mean, std, selector: str, pixels_per_step: int, engine: dict, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SelectionSource(**source).load(self.device)
        self.tag, self.root, self.split = source["tag"], root, split
        self.mean, self.std = tuple(mean), tuple(std)
        self.selector, self.k = selector, pixels_per_step
        self.engine = EngineConfig(**engine)
        self.params = {"k": pixels_per_step}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        images = torch.from_numpy(np.array(batch["image"])).to(self.device)  # (B, C, H, W) uint8
        x = normalize(images, self.mean, self.std)
        res = run_selector(self.selector, self.model, x, self.k, self.engine).cpu()
        _, _, H, W = images.shape
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
            forward_passes=res.forward_passes // max(1, len(batch["image_id"])),
            height=H,
            width=W,
        )
        n = len(batch["image_id"])
        return {"image_id": batch["image_id"], "seconds": np.full(n, (time.perf_counter() - t0) / n)}


def run_selection(
    selector: str,
    source: SelectionSource,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    mean,
    std,
    root: str,
    resources: Resources,
    pixels_per_step: int = 1,
    engine: EngineConfig = EngineConfig(),
    select_batch: int = 64,
) -> int:
    """Run a model selector on in-memory images (ids 0..N-1) not yet in the store."""
    done = store.done_ids(root, source.tag, selector_tag(selector, {"k": pixels_per_step}), split)
    todo = [i for i in range(len(labels)) if i not in done]
    items = [{"image_id": i, "label": int(labels[i]), "image": images[i]} for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(todo) // select_batch)) if items else None
    return run_selection_stream(selector, source, split, ds, root, mean, std, resources, pixels_per_step, engine,
                                select_batch, done=done, total=len(labels))


def run_selection_stream(
    selector: str,
    source: SelectionSource,
    split: str,
    ds: Optional[ray.data.Dataset],
    root: str,
    mean,
    std,
    resources: Resources,
    pixels_per_step: int = 1,
    engine: EngineConfig = EngineConfig(),
    select_batch: int = 64,
    done: Optional[set] = None,
    total: Optional[int] = None,
) -> int:
    """Run a model selector (backselect, bgsis) over a Dataset of {image_id, label, image} rows.

    Images whose id is already in the store are skipped; returns how many were selected now.
    """
    tag = selector_tag(selector, {"k": pixels_per_step})
    if done is None:
        done = store.done_ids(root, source.tag, tag, split)
        if ds is not None and done:
            ds = ds.map_batches(_drop_done, fn_kwargs={"done": np.array(sorted(done), dtype=np.int64)}, batch_format="numpy")
    of = f" of {total}" if total is not None else ""
    print(f"[{tag} {source.tag}/{split}] {len(done)}{of} images already selected" + (f"; {total - len(done)} to go" if total is not None else ""), flush=True)
    if ds is None:
        return 0
    n_todo = (total - len(done)) if total is not None else None
    workers = resources.workers() if n_todo is None else min(resources.workers(), max(1, n_todo // select_batch))
    ds = ds.map_batches(
        SelectionWorker,
        fn_constructor_kwargs=dict(
            source=asdict(source), root=root, split=split, mean=mean, std=std, selector=selector,
            pixels_per_step=pixels_per_step, engine=asdict(engine), threads=1 if not resources.use_gpu else 4,
        ),
        batch_size=select_batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        **resources.per_worker(),
    )
    n = 0
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(out["image_id"])
    return n


def _drop_done(batch: dict, done: np.ndarray) -> dict:
    """Batch-wise filter: keep the rows whose image_id is not in the sorted array `done`."""
    keep = ~np.isin(batch["image_id"], done)
    return {k: v[keep] for k, v in batch.items()}


def write_random(root: str, split: str, labels: np.ndarray, hw: int, height: int, width: int, seed: int, select_batch: int,
                 image_ids: Optional[np.ndarray] = None) -> int:
    """The random baseline: a seeded permutation per image, stored like a selection (model "none").

    image_ids: the ids of `labels`' images (default 0..N-1).
    """
    params = {"seed": seed}
    tag = selector_tag("random", params)
    ids_all = np.arange(len(labels), dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    done = store.done_ids(root, "none", tag, split)
    todo = np.array([j for j, i in enumerate(ids_all) if int(i) not in done], dtype=np.int64)  # positions
    for start in range(0, len(todo), select_batch):
        pos = todo[start : start + select_batch]
        store.write_rows(
            root, model="none", selector=tag, selector_params=params_json(params), split=split,
            image_id=ids_all[pos], label=labels[pos], height=height, width=width,  # the reader regenerates the order from the seed
        )
    return len(todo)
