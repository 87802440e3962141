"""Selection on Ray Data: images are split across actors that run backward selection and write
Parquet shards; the random baseline is written by the driver (it needs no model).

Each actor loads its model once (in __init__) on its GPU, or on CPU where the cluster has none.
Shards are written by the actor as soon as a batch is done, so an interrupted stage loses at most
the batches in flight; a rerun selects only the image ids not yet in the store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from overinterp import store
from overinterp.data import normalize
from overinterp.models import load_ensemble
from overinterp.pipeline.resources import Resources
from overinterp.selection import EngineConfig, params_json, random_order, run_selector, selector_tag


@dataclass(frozen=True)
class SelectionSource:
    """A model to explain: one checkpoint, or several averaged as a MeanEnsemble."""

    tag: str  # the store's model name, e.g. digits_cnn-s0, digits_cnn-ens3
    checkpoints: tuple[str, ...]


class SelectionWorker:
    """Ray Data actor: (image_id, label, image) batches in, Parquet shards out."""

    def __init__(self, source: dict, root: str, split: str, mean, std, selector: str, pixels_per_step: int, engine: dict, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_ensemble(list(source["checkpoints"]), self.device)
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
            curve=res.curve,
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
    """Run a model selector (backselect, bgsis) on every not-yet-stored image of one split.

    Returns how many images were selected in this call.
    """
    tag = selector_tag(selector, {"k": pixels_per_step})
    done = store.done_ids(root, source.tag, tag, split)
    todo = [i for i in range(len(labels)) if i not in done]
    print(f"[{tag} {source.tag}/{split}] {len(done)} of {len(labels)} images already selected; {len(todo)} to go", flush=True)
    if not todo:
        return 0
    items = [{"image_id": i, "label": int(labels[i]), "image": images[i]} for i in todo]
    workers = min(resources.workers(), max(1, len(todo) // select_batch))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(todo) // select_batch))
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


def write_random(root: str, split: str, labels: np.ndarray, hw: int, height: int, width: int, seed: int, select_batch: int) -> int:
    """The random baseline: a seeded permutation per image, stored like a selection (model "none")."""
    params = {"seed": seed}
    tag = selector_tag("random", params)
    done = store.done_ids(root, "none", tag, split)
    todo = np.array([i for i in range(len(labels)) if i not in done], dtype=np.int64)
    for start in range(0, len(todo), select_batch):
        ids = todo[start : start + select_batch]
        store.write_rows(
            root, model="none", selector=tag, selector_params=params_json(params), split=split,
            image_id=ids, label=labels[ids], order=random_order(ids, hw, seed, split), height=height, width=width,
        )
    return len(todo)
