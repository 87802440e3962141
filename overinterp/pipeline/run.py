"""`overinterp run`: the paper's pipeline on a data set held in memory (digits, CIFAR, small folders).

1. train full-image models (model x seed, plus an input-dropout variant) — Ray Tune;
2. selection on every train and test image with each model's first seed, and on the test images with
   the seeds' mean ensemble and the input-dropout model — Ray Data -> Parquet; the seeded random
   baseline beside it;
3. train and test new models on the subsets, on the random subsets, and on the subsets' positions
   alone (the mask, no pixel values: the label-leak control) — Ray Tune;
4. compare: the paper's Table 1 shape, SIS sizes, a gallery — summary.json / summary.md / gallery.png,
   MLflow.

The plan (pipeline/plan.py) says what; the shared driver (pipeline/driver.py) walks it; this module
is the in-memory backend. Every stage skips what the out_dir already holds, so a rerun resumes.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
import torch

from overinterp import fs, store
from overinterp.config import SMOKE_SIZES, RunConfig, check_reuse
from overinterp.data import ImageDataset, denormalize_uint8, load_dataset, normalize
from overinterp.models import load_ensemble
from overinterp.pipeline.driver import accuracy_by_condition, copy_out, log, masks_from_store, run_plan
from overinterp.pipeline.plan import SPLITS, Plan, SelectionJob, plan_small
from overinterp.config import ResourceFlags
from overinterp.pipeline.resources import ResourcePlan, discover_capacity, ensure_ray, plan_resources
from overinterp.pipeline.select_stage import select_in_memory, write_random
from overinterp.pipeline.trial import TrialSpec
from overinterp.pipeline.tune_stage import run_trials
from overinterp.report import save_gallery, sis_stats
from overinterp.selection import apply_mask, keep_mask, n_keep, sis_mask
from overinterp.selection.backselect import EngineConfig
from overinterp.training import TrainConfig, evaluate


def load_data(cfg: RunConfig) -> ImageDataset:
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, strict=cfg.strict)
    return data.subsample(*SMOKE_SIZES) if cfg.smoke else data


class InMemoryBackend:
    """The driver's steps for a data set held in memory."""

    def __init__(self, cfg: RunConfig, plan: Plan, data: ImageDataset, resources: ResourcePlan, callbacks=None):
        self.cfg, self.plan, self.data, self.resources = cfg, plan, data, resources
        self.train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment)
        self.data_dict = {"images": data.images, "labels": data.labels, "mean": data.mean, "std": data.std, "num_classes": data.num_classes}
        self.engine = EngineConfig(compile=cfg.compile, autocast=cfg.autocast if resources.use_gpu else None)
        self.callbacks = callbacks or []

    def train_full(self, specs: list[TrialSpec]) -> dict:
        return run_trials("full", specs, self.data_dict, {}, self.train_cfg, self.cfg.out_dir, self.resources, self.callbacks)

    def baseline(self) -> dict:
        return {}

    def select(self, job: SelectionJob) -> None:
        select_in_memory(job, self.data.images[job.split], self.data.labels[job.split], self.data.mean, self.data.std, self.plan.root,
                         self.resources, self.engine, self.cfg.select_batch)

    def write_random(self, split: str) -> None:
        _, H, W = self.data.shape
        write_random(self.plan.root, split, self.data.labels[split], H, W, self.plan.random_params, self.cfg.select_batch)

    def train_subsets(self, specs: list[TrialSpec]) -> dict:
        n = {s: len(self.data.labels[s]) for s in SPLITS}
        masks = masks_from_store(self.plan, self.plan.subset_keys(), n)
        return run_trials("subsets", specs, self.data_dict, masks, self.train_cfg, self.cfg.out_dir, self.resources, self.callbacks)

    def summarize(self, full: dict, subsets: dict, baseline: dict) -> dict:
        """summary.json's content: per-seed accuracies, SIS sizes, confidence on masked inputs."""
        cfg, plan, data = self.cfg, self.plan, self.data
        hw = plan.hw
        test_x, test_y = torch.from_numpy(data.images["test"]), torch.from_numpy(data.labels["test"])
        summary = {
            "dataset": cfg.dataset, "smoke": cfg.smoke, "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, hw), "hw": hw,
            "tau": cfg.tau, "seeds": list(cfg.seeds), "models": list(cfg.models), "selector": plan.primary,
            "accuracy": accuracy_by_condition(plan, full, subsets), "variant_accuracy": {}, "sis": {}, "masked_confidence": {},
            "skipped_images": [list(s) for s in getattr(data, "skipped", ())],
        }
        for m in cfg.models:
            summary["sis"][m], summary["variant_accuracy"][m] = {}, {}
            for variant, source in plan.sources[m].items():
                sel = store.read_selections(plan.root, source.tag, plan.primary, "test", len(test_y))
                stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
                stats.update(label=source.label, model_tag=source.tag)
                summary["sis"][m][variant] = stats
                model = load_ensemble(list(source.checkpoints))
                summary["variant_accuracy"][m][variant] = evaluate(model, test_x, test_y, data.mean, data.std)
                if variant == "plain":
                    k = n_keep(cfg.fraction, hw)
                    conf_on_subset = sel.curve[:, hw - k - 1] if k < hw else sel.confidence
                    summary["masked_confidence"][m] = {
                        "median_confidence": float(conf_on_subset.median()),
                        "accuracy": evaluate(model, test_x, test_y, data.mean, data.std, keep_mask(sel.order, cfg.fraction)),
                    }
        return summary

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

    def reports(self, summary: dict, local_dir: str) -> list[str]:
        """gallery.png: test images beside their subsets, written to out_dir; local copies returned."""
        cfg, plan, data = self.cfg, self.plan, self.data
        n = min(cfg.gallery, len(data.labels["test"]))
        if n == 0:
            return []
        m = cfg.models[0]
        plain = plan.sources[m]["plain"].tag
        sel = store.read_selections(plan.root, plain, plan.primary, "test")
        rnd = store.read_selections(plan.root, "none", plan.random_tag, "test")
        x = normalize(torch.from_numpy(data.images["test"][:n]), data.mean, data.std)
        pct = f"{100 * cfg.fraction:g}%"
        panels = {
            f"{plan.primary} {pct} ({m})": denormalize_uint8(apply_mask(x, keep_mask(sel.order[:n], cfg.fraction)), data.mean, data.std),
            f"random {pct}": denormalize_uint8(apply_mask(x, keep_mask(rnd.order[:n], cfg.fraction)), data.mean, data.std),
            f"SIS τ={cfg.tau:g}": denormalize_uint8(apply_mask(x, sis_mask(sel.order[:n], sel.curve[:n], sel.confidence[:n], cfg.tau)), data.mean, data.std),
        }
        titles = [f"{data.classes[int(sel.label[i])]} → {data.classes[int(sel.pred[i])]} ({sel.confidence[i]:.2f})" for i in range(n)]
        path = os.path.join(local_dir, "gallery.png")
        save_gallery(path, denormalize_uint8(x, data.mean, data.std), panels, titles)
        copy_out([path], cfg.out_dir)
        return [path]


def prepare_run(config: RunConfig, ray_address: str | None = None):
    """Check the config, load the data, build the plan, connect to Ray and plan resources."""
    config.check()
    cfg = config.resolved()
    store.validate_shards(fs.join(cfg.out_dir, "selections"))  # a corrupt shard stops us before any work
    log(f"loading {cfg.dataset}{' (smoke subsample)' if cfg.smoke else ''}")
    data = load_data(cfg)
    plan = plan_small(cfg, data)
    check_reuse(cfg, fs.join(cfg.out_dir, "config.json"))
    ensure_ray(ray_address)
    resources = plan_resources(discover_capacity(), ResourceFlags(**cfg.resource_flags()))
    return cfg, data, plan, resources


def run_pipeline(config: RunConfig, ray_address: str | None = None) -> dict:
    """Run (or resume) the whole pipeline; returns the summary also written to summary.json.

    The run holds the lock of its --out throughout (a second run on it stops at once).
    """
    import time

    from overinterp.pipeline.lock import OutputLock

    t0 = time.time()
    config.check()
    with OutputLock(config.resolved().out_dir, "overinterp run") as lock:
        cfg, data, plan, resources = prepare_run(config, ray_address)
        log(plan.describe())
        log(resources.describe())
        if cfg.autocast and not resources.use_gpu:
            log(f"--autocast {cfg.autocast} needs GPUs; this cluster has none, so selection runs exact fp32 on CPU")
        from overinterp.pipeline.tracking import Tracker  # MLflow only where tracking happens

        with Tracker(cfg, cfg.dataset, resources, previous_holder=lock.taken_over) as tracker:
            summary = run_plan(plan, InMemoryBackend(cfg, plan, data, resources, [tracker.trial_logger()]), tracker)
    log(f"done in {time.time() - t0:.0f} s")
    return summary
