"""Batched Gradient SIS on ImageNet-style data, then models trained on the pixel-subsets: the
streamed backend of the shared driver (pipeline/driver.py).

1. images stream from a folder tree or Parquet (local or s3://) through Ray Data to GPU actors that
   run BGSIS with a pretrained torchvision model and write Parquet shards; undecodable files are
   skipped and recorded;
2. the seeded random baseline is written for the same image ids;
3. Ray Tune trials each run a Ray Train TorchTrainer (pipeline/train_stream.py) on the subsets of
   the train images, tested on the same kind of subsets of the validation images;
4. the pretrained model is evaluated on the full validation images and on its own subsets (the
   baseline every trained model is compared with); MLflow logs each trial against it.

The driver never holds the images: selection streams them, training joins encoded images with their
keep-masks on the Ray Data workers, evaluation streams them again.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from ray.data import ActorPoolStrategy

from overinterp import fs, store
from overinterp.config import ImageNetConfig, ResourceFlags, refuse_other_settings
from overinterp.data import IMAGENET_MEAN, IMAGENET_STD, skipped_line, skipped_summary
from overinterp.models import create_model
from overinterp.pipeline.driver import accuracy_by_condition, log, run_job
from overinterp.pipeline.images import check_folder, is_parquet, list_classes, read_images
from overinterp.pipeline.plan import Plan, SelectionJob, plan_stream
from overinterp.pipeline.resources import ResourcePlan, discover_capacity, ensure_ray, plan_resources, worker_device
from overinterp.pipeline.select_stage import SELECTION_ATTEMPTS, lost_worker, select_stream, write_random
from overinterp.pipeline.train_stream import MASK_COLUMN, cuda_on_gpu_workers, run_stream_trial, subset_stream, unpack_keep
from overinterp.pipeline.trial import TrialSpec, load_result
from overinterp.pipeline.tune_stage import collect_results, launch_trials
from overinterp.selection import n_keep
from overinterp.training import TrainConfig, prepare

SPLIT_FIELD = {"train": "train", "test": "val"}  # store split -> config field


def count_images(path: str, classes, limit) -> int:
    """Images in a source without reading them: a folder listing, or Parquet footers."""
    if is_parquet(path):
        f, p = fs.resolve(path)
        import pyarrow.fs as pafs

        info = f.get_file_info(p)
        files = [p] if info.type == pafs.FileType.File else [i.path for i in f.get_file_info(pafs.FileSelector(p, recursive=True))
                                                            if i.base_name.endswith(".parquet")]
        n = sum(pq.read_metadata(x, filesystem=f).num_rows for x in files)
    else:
        n = sum(check_folder(path, classes).values())
    return min(n, limit) if limit else n


class EvalWorker:
    """Ray Data actor: correct predictions of the pretrained model on full and on subset images."""

    def __init__(self, model: dict, hw: int):
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

    def __init__(self, cfg: ImageNetConfig, plan: Plan, classes, resources: ResourcePlan, callbacks=None):
        self.cfg, self.plan, self.classes, self.resources = cfg, plan, classes, resources
        self.source = plan.sources[cfg.train_model]["pretrained"]
        self.skipped: dict[str, list] = {}
        self.callbacks = callbacks or []

    def _path(self, split: str) -> str:
        return getattr(self.cfg, SPLIT_FIELD[split])

    def train_full(self, specs):  # the explained model is pretrained: nothing to train
        return {}

    def select(self, job: SelectionJob) -> None:
        done = store.done_ids(self.plan.root, job.source.tag, job.tag, job.split)  # a rerun decodes only the rest
        ds = read_images(self._path(job.split), self.cfg.image_size, self.classes, self.cfg.max_images, self.cfg.strict,
                         skip_ids=np.array(sorted(done), dtype=np.int64))
        _, skipped = select_stream(job, ds, self.plan.root, IMAGENET_MEAN, IMAGENET_STD, self.resources, select_batch=self.cfg.select_batch,
                                   done=done, total=self.plan.n_images[job.split], hw=self.plan.shape[1:])
        self.skipped[job.split] = skipped
        if skipped:
            log(f"{job.split}: {skipped_line(skipped)}")

    def write_random(self, split: str) -> None:
        """For exactly the images the model selection kept (bad files excluded), ids from the store."""
        fsys, paths = store.shard_files(self.plan.root, self.source.tag, self.plan.primary, split)
        rows = [store.read_shard(fsys, p, ["image_id", "label"]) for p in paths]
        ids = np.concatenate([r.column("image_id").to_numpy() for r in rows])
        labels = np.concatenate([r.column("label").to_numpy() for r in rows])
        S = self.cfg.image_size
        write_random(self.plan.root, split, labels, S, S, self.plan.random_params, self.cfg.select_batch, ids)

    def _streams(self, subset: str) -> dict:
        cfg = self.cfg
        return {name: subset_stream(self._path(split), self.classes, cfg.max_images, cfg.image_size, self.plan.root, subset, split,
                                    cfg.fraction, self.plan.n_images[split]) for name, split in (("train", "train"), ("val", "test"))}

    def train_subsets(self, specs: list[TrialSpec]) -> dict:
        cfg, res = self.cfg, self.resources
        pending = [s for s in specs if load_result(cfg.out_dir, s) is None]
        print(f"[subsets] {len(specs) - len(pending)} of {len(specs)} trials already finished in {cfg.out_dir}", flush=True)
        if pending:
            use_cuda = res.use_gpu and cuda_on_gpu_workers(res.gpus_per_trial)
            if res.use_gpu and not use_cuda:
                log("GPU workers report no CUDA device (simulated GPUs, or a broken driver): Train workers keep their GPU but compute on CPUs with gloo")
            train_config = asdict(TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment))
            info = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "hw": self.plan.hw, "num_classes": self.plan.num_classes}
            backend = self

            def trainable(config: dict) -> None:
                from ray import tune

                spec = TrialSpec(**config["trial"])
                result = run_stream_trial(spec, backend._streams(spec.subset), train_config, info, cfg.out_dir, res, use_cuda,
                                          cfg.workers_per_trial)
                tune.report({"accuracy": result["accuracy"], "train_loss": result["train_loss"], "seconds": result["seconds"], "done": True})

            # the trial itself only drives its trainer: the Train workers hold the CPUs and GPUs
            driver_res = ResourcePlan(**{**asdict(res), "cpus_per_trial": 0, "gpus_per_trial": 0,
                                         "trial_concurrency": res.streamed_trial_concurrency(cfg.workers_per_trial)})
            launch_trials("subsets", pending, trainable, cfg.out_dir, driver_res, len(specs), self.callbacks)
        return collect_results("subsets", specs, cfg.out_dir)

    def baseline(self) -> dict:
        """Top-1 of the pretrained model on the full validation images and on its own subsets."""
        val = subset_stream(self.cfg.val, self.classes, self.cfg.max_images, self.cfg.image_size, self.plan.root,
                            f"{self.source.tag}/{self.plan.primary}", "test", self.cfg.fraction, self.plan.n_images["test"])
        with warnings.catch_warnings():  # max_restarts has no named parameter yet (see select_stage._select_pass)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            out = val.map_batches(EvalWorker, fn_constructor_kwargs={"model": self.source.model, "hw": self.plan.hw}, batch_size=self.cfg.batch_size,
                                  batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=self.resources.select_workers),
                                  max_restarts=0,  # as selection (select_stream): a lost worker reruns the pass, not the actor
                                  **self.resources.worker_request())
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

    def summarize(self, full: dict, subsets: dict, baseline: dict) -> dict:
        cfg, plan = self.cfg, self.plan
        baseline = baseline or self.baseline()
        return {
            "dataset": plan.dataset, "model": cfg.model, "weights": cfg.weights, "train_model": cfg.train_model, "selector": plan.primary,
            "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, plan.hw), "hw": plan.hw, "seeds": list(cfg.seeds),
            "images": {s: int(store_count(plan.root, self.source.tag, plan.primary, s)) for s in ("train", "test")},
            "baseline": baseline,
            "accuracy": accuracy_by_condition(plan, full, subsets),
            "skipped_images": {s: skipped_summary(v) for s, v in self.skipped.items()},
        }

    def reports(self, summary: dict, local_dir: str) -> list[str]:
        return []

    def dataset_input(self) -> dict:
        """Source and digest of the train split, from its listing (names and sizes: nothing is read)."""
        import hashlib

        import pyarrow.fs as pafs

        f, p = fs.resolve(self.cfg.train)
        info = f.get_file_info(p)
        entries = [info] if info.type == pafs.FileType.File else f.get_file_info(pafs.FileSelector(p, recursive=True))
        h = hashlib.sha256()
        for e in sorted((e for e in entries if e.type == pafs.FileType.File), key=lambda e: e.path):
            h.update(f"{e.path[len(p):]}:{e.size}".encode())
        return {"name": f"imagenet-{self.cfg.max_images or 'all'}", "source": self.cfg.train, "digest": h.hexdigest()[:16]}

    def models_to_log(self) -> dict:
        return {}  # the explained model is a published pretrained one; subset models stay as checkpoints


def store_count(root: str, model: str, selector: str, split: str) -> int:
    return len(store.done_ids(root, model, selector, split))


def prepare_imagenet(config: ImageNetConfig, ray_address: str | None = None):
    """Check the config, count the images, build the plan, connect to Ray and plan resources.
    Writes nothing to --out (the budget guard and --dry-run must leave it untouched)."""
    from overinterp.pipeline.lock import OutputLock

    config.check()
    cfg = config.resolved()
    OutputLock(cfg.out_dir).check_free()  # a live run on this --out stops us before Ray and calibration (reads only)
    store.validate_shards(fs.join(cfg.out_dir, "selections"))  # a corrupt shard stops us before any work (it only reads)
    refuse_other_settings(cfg, fs.join(cfg.out_dir, "config.json"))  # other settings stop us (and a dry run) before any work
    classes = None if is_parquet(cfg.train) else list_classes(cfg.train)
    num_classes = cfg.num_classes or (len(classes) if classes else 1000)
    create_model(cfg.model, num_classes, weights=cfg.weights)  # fail now, not in an actor, if the weights do not fit
    n_images = {"train": count_images(cfg.train, classes, cfg.max_images), "test": count_images(cfg.val, classes, cfg.max_images)}
    plan = plan_stream(cfg, num_classes, n_images)
    ensure_ray(ray_address)
    resources = plan_resources(discover_capacity(), ResourceFlags(**cfg.resource_flags()))
    return cfg, classes, plan, resources


def run_imagenet(config: ImageNetConfig, ray_address: str | None = None, dry_run: bool = False) -> Optional[dict]:
    """Run (or resume) the ImageNet study; returns the summary also written to summary.json.

    First the plan: stages, resources, passes and an ETA from a short calibration on the selection
    device; a plan over --max-hours stops here (BudgetExceeded), and so does --dry-run (returns
    None), both before anything is written to --out.
    """
    t0 = time.time()
    cfg, classes, plan, resources = prepare_imagenet(config, ray_address)
    log(plan.describe())
    log(resources.describe())
    return run_job(cfg, plan, resources, lambda callbacks, cost: StreamBackend(cfg, plan, classes, resources, callbacks),
                   holder="sis_imagenet.py", dataset="imagenet", t0=t0, dry_run=dry_run,
                   trial_concurrency=resources.streamed_trial_concurrency(cfg.workers_per_trial))


def imagenet_markdown(summary: dict) -> str:
    from overinterp.report import summary_markdown

    return summary_markdown(summary)

