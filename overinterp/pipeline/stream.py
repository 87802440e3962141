"""The streamed data backend: any ImageFolder or Parquet source (local or s3://), never held whole.

1. full-image models are trained as Ray Tune trials that each run a Ray Train TorchTrainer
   (pipeline/train_stream.py), or a pretrained torchvision model is taken as the explained one;
2. images stream through Ray Data to GPU actors that run each selector with each explained model
   and write Parquet shards; undecodable files are skipped and recorded; the seeded random
   baseline is written for the same image ids;
3. the subset models are trained the same way on the subsets of the train images, tested on the
   same kind of subsets of the validation images;
4. a pretrained model is evaluated on the full validation images and on its own subsets (the
   baseline every trained model is compared with); MLflow logs each trial against its baseline.

The driver never holds the images: selection streams them, training joins encoded images with their
keep-masks on the Ray Data workers, evaluation streams them again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from ray.data import Dataset

from overinterp import store
from overinterp.config import SMOKE_SIZES, RunConfig
from overinterp.data import IMAGENET_MEAN, IMAGENET_STD, skipped_line, skipped_summary
from overinterp.models import create_model
from overinterp.pipeline.analysis import TestImages
from overinterp.pipeline.images import MASK_COLUMN, check_folder, drop_bad, is_parquet, list_classes, list_folder, parquet_rows, read_images
from overinterp.pipeline.plan import Plan, SelectionJob
from overinterp.pipeline.resources import ResourcePlan, exit_with_parent, worker_device
from overinterp.pipeline.select_stage import (SELECTION_ATTEMPTS, lost_worker, map_on_actors, select_stream, selection_engine, stored_random_ids,
                                              write_random)
from overinterp.pipeline.terminal import log
from overinterp.pipeline.train_stream import (SHUFFLE_BUFFER_IMAGES, broadcast_join, cuda_on_gpu_workers, mask_table_refs, run_stream_trial,
                                               subset_stream, unpack_keep)
from overinterp.pipeline.trial import TrialSpec, load_result
from overinterp.pipeline.tune_stage import collect_results, launch_trials
from overinterp.training import TrainConfig, prepare

# Test images the analysis (SIS sizes, the selector table, plots, gallery) decodes into the driver:
# a bounded sample; the trained models' accuracies come from their trials over the whole split.
ANALYSIS_IMAGES = 2000


def listing_digest(path: str) -> str:
    """16 hex digits of sha256 over every file's relative path and size, in path order: a listing, no
    file read (images.list_folder's, made once per run; a file: its own size)."""
    return list_folder(path).digest


def count_images(path: str, classes, limit, num_classes: Optional[int] = None, shuffle_buffer: Optional[int] = None) -> int:
    """Images in a source without reading them: a folder listing, or Parquet footers (checked as
    images.parquet_rows says: Parquet, its columns, labels below num_classes, rows in label order)."""
    if is_parquet(path):
        n = parquet_rows(path, num_classes, shuffle_buffer)
    else:
        n = sum(check_folder(path, classes).values())
    return min(n, limit) if limit else n


@dataclass(frozen=True)
class StreamSource:
    """What the driver knows of a streamed source before any image is decoded: listings and footers."""

    train: str
    val: str
    classes: Optional[list]  # an ImageFolder's class folders (the train split's); None for Parquet
    num_classes: int
    n_images: dict  # split -> images (capped by --max-images, or the smoke sizes)
    shape: tuple  # (C, H, W) after resize and centre crop
    limits: dict  # split -> the first N images read (None: all)

    @classmethod
    def open(cls, cfg: RunConfig) -> "StreamSource":
        """Lists each split once (the run forgets older listings first: `driver.prepare`)."""
        classes = None if is_parquet(cfg.train) else list_classes(cfg.train)
        num_classes = cfg.num_classes or (len(classes) if classes else 1000)
        if cfg.pretrained:  # fail now, before the listing and not in an actor, if the weights do not fit (images decode to RGB)
            create_model(cfg.pretrained, num_classes, in_channels=3, weights=cfg.weights)
        limits = {"train": cfg.max_images, "test": cfg.max_images}
        if cfg.smoke:
            limits = {s: min(n, cfg.max_images or n) for s, n in zip(("train", "test"), SMOKE_SIZES)}
        n_images = {split: count_images(cfg.train if split == "train" else cfg.val, classes, limits[split], num_classes,
                                        SHUFFLE_BUFFER_IMAGES if split == "train" else None)
                    for split in ("train", "test")}
        S = cfg.image_size
        return cls(cfg.train, cfg.val, classes, num_classes, n_images, (3, S, S), limits)

    def path(self, split: str) -> str:
        return self.train if split == "train" else self.val


class EvalWorker:
    """Ray Data actor: correct predictions of the pretrained model on full and on subset images."""

    def __init__(self, model: dict, hw: int):
        exit_with_parent()
        self.device = worker_device()
        self.model = create_model(**model).to(self.device).eval()
        self.hw = hw

    def __call__(self, batch: dict) -> dict:
        x = torch.from_numpy(np.asarray(batch["image"])).to(self.device)
        y = torch.from_numpy(np.asarray(batch["label"])).to(self.device)
        keep = unpack_keep(torch.from_numpy(np.asarray(batch[MASK_COLUMN])).to(self.device), self.hw)
        with torch.inference_mode():
            full = self.model(prepare(x, IMAGENET_MEAN, IMAGENET_STD, None)).argmax(1) == y
            own = self.model(prepare(x, IMAGENET_MEAN, IMAGENET_STD, keep)).argmax(1) == y
        return {"full": full.cpu().numpy(), "own": own.cpu().numpy()}


class StreamBackend:
    """The driver's steps for data streamed through Ray Data."""

    def __init__(self, cfg: RunConfig, plan: Plan, source: StreamSource, resources: ResourcePlan, callbacks=None):
        self.cfg, self.plan, self.data, self.resources = cfg, plan, source, resources
        self.explained = next(iter(plan.sources[cfg.models[0]].values()))  # plain (first seed) or pretrained
        self.skipped: dict[str, list] = {}
        self.callbacks = callbacks or []

    def _read(self, split: str, **kwargs):
        return read_images(self.data.path(split), self.cfg.image_size, self.data.classes, self.data.limits[split], self.cfg.strict,
                           images=self.plan.n_images[split], **kwargs)

    def train_full(self, specs: list[TrialSpec]) -> dict:
        return self._train("full", specs)

    def select(self, jobs: list[SelectionJob]) -> None:
        """Every job in one pass through one pool of actors, each job reading its split (the splits are
        not held); a rerun decodes only the images not yet stored."""
        totals = [self.plan.n_images[job.split] for job in jobs]

        def todo(done: list[np.ndarray]) -> Optional[Dataset]:
            reads = [self._read(job.split, skip_ids=stored, job=j) for j, (job, stored, total) in enumerate(zip(jobs, done, totals))
                     if len(stored) < total]
            if not reads:
                return None
            ds = reads[0].union(*reads[1:])
            if any(self.data.limits.values()):  # a pilot's first images: in file order, as every stage reads them (images._first)
                ds.context.execution_options.preserve_order = True
            return ds

        _, skipped = select_stream(jobs, todo, self.plan.root, IMAGENET_MEAN, IMAGENET_STD, self.resources,
                                   selection_engine(self.cfg, self.resources), select_batch=self.cfg.selection_batch(True), totals=totals, hw=self.plan.shape[1:])
        for job, bad in zip(jobs, skipped):
            if bad or job.split not in self.skipped:  # each job of a split reads the same files
                self.skipped[job.split] = bad
        for split, bad in self.skipped.items():
            if bad:
                log(f"{split}: {skipped_line(bad)}")

    def write_random(self, split: str) -> None:
        """For exactly the images the model selection kept (bad files excluded), ids from the store:
        shard by shard, one random shard per selection shard (the driver holds one shard's ids at a time)."""
        fsys, paths = store.shard_files(self.plan.root, self.explained.tag, self.plan.primary, split)
        done = stored_random_ids(self.plan.root, split, self.plan.random_params)
        S = self.cfg.image_size
        for p in paths:
            rows = store.read_shard(fsys, p, ["image_id", "label"])
            write_random(self.plan.root, split, rows.column("label").to_numpy(), S, S, self.plan.random_params, max(1, rows.num_rows),
                         rows.column("image_id").to_numpy(), done)

    def _mask_tables(self, specs: list[TrialSpec]) -> dict:
        """{(subset, split): table} of the stage's selections joined by lookup (mask_table_refs): each
        read from the store and put in the object store once, not once per trial."""
        keys = [(subset, split) for subset in sorted({s.subset for s in specs if s.subset}) for split in ("train", "test")
                if broadcast_join(self.plan.n_images[split], self.plan.hw)]
        return mask_table_refs(self.plan.root, keys, self.plan.hw, self.cfg.fraction, self.plan.n_images)

    def _streams(self, spec: TrialSpec, tables: dict) -> dict:
        """{"train", "val"} datasets of one trial: the images with their keep-masks (all pixels for full
        images); tables: _mask_tables' result. The training files come in an order drawn from the
        trial's seed (subset_stream)."""
        cfg, data = self.cfg, self.data
        streams = {name: subset_stream(data.path(split), data.classes, data.limits[split], cfg.image_size, self.plan.root, spec.subset,
                                       split, cfg.fraction, self.plan.n_images[split], tables.get((spec.subset, split)),
                                       shuffle_seed=spec.seed if name == "train" else None)
                   for name, split in (("train", "train"), ("val", "test"))}
        return streams

    def train_subsets(self, specs: list[TrialSpec]) -> dict:
        return self._train("subsets", specs)

    def _train(self, stage: str, specs: list[TrialSpec]) -> dict:
        cfg, res = self.cfg, self.resources
        pending = [s for s in specs if load_result(cfg.out_dir, s) is None]
        print(f"[{stage}] {len(specs) - len(pending)} of {len(specs)} trials already finished in {cfg.out_dir}", flush=True)
        if pending:
            use_cuda = res.use_gpu and cuda_on_gpu_workers(res.gpus_per_trial)
            if res.use_gpu and not use_cuda:
                log("GPU workers report no CUDA device (simulated GPUs, or a broken driver): Train workers keep their GPU but compute on CPUs with gloo")
            train_config = asdict(TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment))
            info = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "hw": self.plan.hw, "num_classes": self.plan.num_classes}
            tables = self._mask_tables(pending)

            def trainable(config: dict) -> None:
                from ray import tune

                spec = TrialSpec(**config["trial"])
                result = run_stream_trial(spec, self._streams(spec, tables), train_config, info, cfg.out_dir, res, use_cuda,
                                          cfg.workers_per_trial)
                tune.report({"accuracy": result["accuracy"], "train_loss": result["train_loss"], "seconds": result["seconds"], "done": True})

            # one worker trains in the trial's own process (train_stream: no Train worker group), which holds its
            # CPUs and GPU; with more, the trial only drives its trainer and the Train workers hold them
            trial_res = res if cfg.workers_per_trial == 1 else ResourcePlan(**{**asdict(res), "cpus_per_trial": 0, "gpus_per_trial": 0})
            launch_trials(stage, pending, trainable, cfg.out_dir, trial_res, len(specs), self.callbacks)
        return collect_results(stage, specs, cfg.out_dir)

    def baseline(self, test: TestImages) -> Optional[dict]:
        """Top-1 of a pretrained explained model on the full validation images and on its own subsets,
        from a pass over the whole split where the analysis's `test` images are only the first of it;
        None where they are all of it (the analysis measures the baseline on them: no workers to
        start) or the full-image models were trained (they are the baselines)."""
        if not self.explained.model or len(test.labels) == test.total:
            return None
        val = subset_stream(self.data.val, self.data.classes, self.data.limits["test"], self.cfg.image_size, self.plan.root,
                            f"{self.explained.tag}/{self.plan.primary}", "test", self.cfg.fraction, self.plan.n_images["test"])
        # as selection (select_stream): a lost worker reruns the pass, not the actor
        out = map_on_actors(val, EvalWorker, self.resources, self.resources.select_workers, self.cfg.batch_size,
                            model=self.explained.model, hw=self.plan.hw)
        for attempt in range(1, SELECTION_ATTEMPTS + 1):
            full = own = n = 0
            try:
                for b in out.iter_batches(batch_size=None, batch_format="numpy"):
                    full, own, n = full + int(b["full"].sum()), own + int(b["own"].sum()), n + len(b["full"])
                break
            except Exception as e:
                if attempt == SELECTION_ATTEMPTS or not lost_worker(e):
                    raise
                log(f"baseline: a worker was lost ({type(lost_worker(e)).__name__}); evaluating again (attempt {attempt + 1})")
        return {"full": full / max(n, 1), "own_subsets": own / max(n, 1), "images": n}

    def test_images(self) -> TestImages:
        """The first ANALYSIS_IMAGES images of the test split with a stored selection, decoded into the
        driver: the analysis's sample (bounded, whatever the split's size)."""
        stored = store.done_ids(self.plan.root, self.explained.tag, self.plan.primary, "test")
        want = min(ANALYSIS_IMAGES, self.plan.n_images["test"])
        ds = drop_bad(read_images(self.data.val, self.cfg.image_size, self.data.classes, self.data.limits["test"], images=self.plan.n_images["test"]))
        ids, images, labels = [], [], []
        for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
            keep = np.isin(b["image_id"], stored)
            ids.append(b["image_id"][keep]), images.append(b["image"][keep]), labels.append(b["label"][keep])
            if sum(len(i) for i in ids) >= want:
                break
        ids, images, labels = (np.concatenate(a) for a in (ids, images, labels))
        order = np.argsort(ids, kind="stable")[:want]
        classes = tuple(self.data.classes) if self.data.classes else tuple(str(c) for c in range(self.plan.num_classes))
        return TestImages(ids[order], images[order], labels[order].astype(np.int64), IMAGENET_MEAN, IMAGENET_STD, classes, len(stored))

    def prior_images(self) -> None:
        return None  # a streamed split is not held: the explain stage takes --generator (prepare checks it)

    def skipped_images(self) -> dict:
        return {s: skipped_summary(v) for s, v in self.skipped.items()}

    def dataset_input(self) -> dict:
        """Source and digest of the train split, from its listing (names and sizes: nothing is read)."""
        return {"name": f"{self.cfg.dataset}-{self.cfg.max_images or 'all'}", "source": self.data.train, "digest": listing_digest(self.data.train)}

    def models_to_log(self) -> dict:
        return {}  # streamed models stay as checkpoints in --out (a published pretrained model is not re-logged)

