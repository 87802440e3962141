"""The in-memory data backend: the paper's pipeline on a data set held in the driver (digits, CIFAR,
an ImageFolder that fits in memory).

The plan (pipeline/plan.py) says what is trained, selected and compared; the driver
(pipeline/driver.py) walks it; this module holds the images and hands them to the stages (Ray Tune
trials, Ray Data selection into Parquet). Every stage skips what the out_dir already holds, so a
rerun resumes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from overinterp import store
from overinterp.config import SMOKE_SIZES, RunConfig
from overinterp.data import ImageDataset, load_dataset, load_imagefolder_splits, normalize, skipped_summary
from overinterp.pipeline.analysis import TestImages
from overinterp.pipeline.plan import SPLITS, Plan, SelectionJob
from overinterp.pipeline.resources import ResourcePlan
from overinterp.pipeline.select_stage import select_in_memory, selection_engine, write_random
from overinterp.pipeline.trial import TrialSpec
from overinterp.pipeline.tune_stage import run_trials
from overinterp.selection import keep_mask
from overinterp.training import TrainConfig


def load_data(cfg: RunConfig) -> ImageDataset:
    """The data set in memory: by name, or the --train/--val ImageFolder splits."""
    if cfg.data_root is None and cfg.train is not None:
        data = load_imagefolder_splits(cfg.train, cfg.val, cfg.image_size, strict=cfg.strict)
    else:
        data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, strict=cfg.strict)
    return data.subsample(*SMOKE_SIZES) if cfg.smoke else data


class InMemoryBackend:
    """The driver's steps for a data set held in memory."""

    def __init__(self, cfg: RunConfig, plan: Plan, data: ImageDataset, resources: ResourcePlan, callbacks=None):
        self.cfg, self.plan, self.data, self.resources = cfg, plan, data, resources
        self.train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment)
        self.data_dict = {"images": data.images, "labels": data.labels, "mean": data.mean, "std": data.std, "num_classes": data.num_classes}
        self.callbacks = callbacks or []

    def train_full(self, specs: list[TrialSpec]) -> dict:
        return run_trials("full", specs, self.data_dict, {}, self.train_cfg, self.cfg.out_dir, self.resources, self.callbacks)

    def baseline(self, test: TestImages) -> None:
        return None  # the analysis looks at every test image: it measures a pretrained model's baseline itself

    def select(self, jobs: list[SelectionJob]) -> None:
        """Every job through one pool of actors (their start is paid once)."""
        select_in_memory(jobs, self.data.images, self.data.labels, self.data.mean, self.data.std, self.plan.root, self.resources,
                         selection_engine(self.cfg, self.resources), self.cfg.selection_batch(False))

    def write_random(self, split: str) -> None:
        _, H, W = self.data.shape
        write_random(self.plan.root, split, self.data.labels[split], H, W, self.plan.random_params, self.cfg.selection_batch(False))

    def train_subsets(self, specs: list[TrialSpec]) -> dict:
        masks = {}  # {subset key: {split: (N, HW) bool keep-mask}}, read back from the store, checked complete
        for key in self.plan.subset_keys():
            model_tag, sel_tag = key.split("/")
            masks[key] = {s: keep_mask(store.read_selections(self.plan.root, model_tag, sel_tag, s, expect_n=len(self.data.labels[s])).order,
                                       self.plan.fraction).numpy() for s in SPLITS}
        return run_trials("subsets", specs, self.data_dict, masks, self.train_cfg, self.cfg.out_dir, self.resources, self.callbacks)

    def dataset_input(self) -> dict:
        import hashlib

        h = hashlib.sha256()
        for split in SPLITS:
            h.update(np.ascontiguousarray(self.data.images[split]).tobytes())
            h.update(np.ascontiguousarray(self.data.labels[split]).tobytes())
        if self.cfg.dataset == "digits":
            import sklearn.datasets

            source = os.path.join(os.path.dirname(sklearn.datasets.__file__), "data", "digits.csv.gz")  # scikit-learn's bundled file
        else:
            source = os.path.abspath(self.cfg.data_root)
        return {"name": f"{self.cfg.dataset}{'-smoke' if self.cfg.smoke else ''}", "source": source, "digest": h.hexdigest()[:16],
                "images": self.data.images["train"], "labels": self.data.labels["train"]}

    def models_to_log(self) -> dict:
        """The full-image models (every seed, with and without input dropout) with an example input."""
        from overinterp.models import load_checkpoint
        from overinterp.pipeline.trial import checkpoint_path

        example = normalize(torch.from_numpy(self.data.images["test"][:2]), self.data.mean, self.data.std)
        return {spec.name: (load_checkpoint(checkpoint_path(self.cfg.out_dir, spec)), example) for spec in self.plan.full_trials}

    def test_images(self) -> TestImages:
        """Every test image: the analysis looks at all of them."""
        d = self.data
        n = len(d.labels["test"])
        return TestImages(np.arange(n), d.images["test"], d.labels["test"], d.mean, d.std, tuple(d.classes), n)

    def skipped_images(self) -> dict:
        return {s: skipped_summary(self.data.skipped.get(s, ())) for s in SPLITS}

    def prior_images(self) -> np.ndarray:
        return self.data.images["train"]
