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
from typing import Optional

import numpy as np
import torch

from overinterp import fs, store
from overinterp.config import SMOKE_SIZES, RunConfig, refuse_other_settings
from overinterp.data import ImageDataset, denormalize_uint8, load_dataset, normalize
from overinterp.models import load_ensemble
from overinterp.pipeline.driver import accuracy_by_condition, copy_out, log, masks_from_store, run_job
from overinterp.pipeline.plan import SPLITS, Plan, SelectionJob, plan_small
from overinterp.config import ResourceFlags
from overinterp.pipeline.resources import ResourcePlan, discover_capacity, ensure_ray, plan_resources
from overinterp.pipeline.select_stage import select_in_memory, write_random
from overinterp.pipeline.trial import TrialSpec
from overinterp.pipeline.tune_stage import run_trials
from overinterp.report import plot_accuracy_by_condition, plot_confidence_vs_removed, plot_sis_size_histograms, save_gallery, sis_stats
from overinterp.selection import apply_mask, keep_mask, n_keep, sis_mask, sis_size, tail_mask
from overinterp.selection.subsets import dilate_keep
from overinterp.selection.backselect import EngineConfig
from overinterp.fill import fill as fill_removed
from overinterp.training import TrainConfig, class_confidence, evaluate


def load_data(cfg: RunConfig) -> ImageDataset:
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, strict=cfg.strict)
    return data.subsample(*SMOKE_SIZES) if cfg.smoke else data


class InMemoryBackend:
    """The driver's steps for a data set held in memory."""

    def __init__(self, cfg: RunConfig, plan: Plan, data: ImageDataset, resources: ResourcePlan, callbacks=None, cost=None):
        self.cfg, self.plan, self.data, self.resources = cfg, plan, data, resources
        self.train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment)
        self.data_dict = {"images": data.images, "labels": data.labels, "mean": data.mean, "std": data.std, "num_classes": data.num_classes}
        self.engine = EngineConfig(compile=cfg.compile, autocast=cfg.autocast if resources.use_gpu else None)
        self.callbacks = callbacks or []
        self.cost = cost  # the CostPlan printed at the start (training progress reports against it)
        self._read: dict[tuple[str, str, str], tuple[store.Selections, int | None]] = {}  # see _selections

    def _selections(self, source_tag: str, tag: str, split: str, n: int | None = None) -> store.Selections:
        """One (model, selector, split) of the store, read once per run: the summary, the selector
        table, the gallery and the plots all look at the same test selections. Where n is given the
        ids must be 0..n-1: store.read_selections checks it on the first read, and this does where an
        earlier caller gave no count. The tensors are shared between callers: read, never modify."""
        key = (source_tag, tag, split)
        if key not in self._read:
            self._read[key] = (store.read_selections(self.plan.root, source_tag, tag, split, n), n)
        sel, checked_n = self._read[key]
        if n is not None and n != checked_n:
            if not np.array_equal(sel.image_id, np.arange(n)):  # the ids come sorted
                where = store.selection_dir(self.plan.root, source_tag, tag, split)
                raise store.StoreError(f"{where} holds {len(sel.image_id)} of {n} images: rerun the selection stage")
            self._read[key] = (sel, n)
        return sel

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
        """summary.json's content: per-seed accuracies, SIS sizes, confidence on masked inputs, and
        the selector comparison."""
        cfg, plan, data = self.cfg, self.plan, self.data
        hw = plan.hw
        test_x, test_y = torch.from_numpy(data.images["test"]), torch.from_numpy(data.labels["test"])
        summary = {
            "dataset": cfg.dataset, "smoke": cfg.smoke, "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, hw), "hw": hw,
            "tau": cfg.tau, "seeds": list(cfg.seeds), "models": list(cfg.models), "selector": plan.primary,
            "selectors": list(dict.fromkeys(j.tag for j in plan.selections)),  # primary first
            "fills": list(plan.fills), "num_classes": data.num_classes,
            "accuracy": accuracy_by_condition(plan, full, subsets), "variant_accuracy": {}, "sis": {}, "masked_confidence": {},
            "comparison": {}, "skipped_images": [list(s) for s in getattr(data, "skipped", ())],
        }
        for m in cfg.models:
            summary["sis"][m], summary["variant_accuracy"][m] = {}, {}
            for variant, source in plan.sources[m].items():
                sel = self._selections(source.tag, plan.primary, "test", len(test_y))
                stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
                stats.update(label=source.label, model_tag=source.tag)
                summary["sis"][m][variant] = stats
                model = load_ensemble(list(source.checkpoints))
                summary["variant_accuracy"][m][variant] = evaluate(model, test_x, test_y, data.mean, data.std)
            summary["comparison"][m] = self.compare_selectors(m, summary["accuracy"][m])
            primary_row = next(r for r in summary["comparison"][m]["selectors"] if r["selector"] == plan.primary)
            summary["masked_confidence"][m] = {"median_confidence": primary_row["median_confidence"], "accuracy": primary_row["full_model_accuracy"]}
        return summary

    def compare_selectors(self, model_name: str, accuracy: dict) -> dict:
        """One row per selector, and the random floor: accuracy of models trained on its subsets under
        each fill and on its positions alone (lists over seeds), the full-image model's accuracy and
        median p(c) on those subsets (test images, mean fill), the median SIS size at tau, and the
        median p(c) once each SIS pixel's 3x3 neighbourhood is restored ("dilation")."""
        cfg, plan, data = self.cfg, self.plan, self.data
        H, W = plan.shape[1:]
        test_x, test_y = torch.from_numpy(data.images["test"]), torch.from_numpy(data.labels["test"])
        source = plan.sources[model_name]["plain"]
        model = load_ensemble(list(source.checkpoints))
        seed = cfg.seeds[0]

        def accuracies(key: str) -> dict:
            by_fill = {f: accuracy.get(TrialSpec(model_name, seed, key, f).condition, []) for f in plan.fills}
            return {"accuracy": by_fill, "positions": accuracy.get(TrialSpec(model_name, seed, key, "positions").condition)}

        rows = []
        for job in plan.selections:
            if job.source != source or job.split != "test":
                continue
            sel = self._selections(source.tag, job.tag, "test", len(test_x))
            keep = keep_mask(sel.order, cfg.fraction)
            k = int(keep[0].sum())
            on_subset = sel.curve[:, plan.hw - k - 1] if k < plan.hw else sel.confidence
            sis = sis_mask(sel.order, sel.curve, sel.confidence, cfg.tau)
            has_sis = sis.any(1)
            pred = torch.as_tensor(sel.pred)
            dilated = class_confidence(model, test_x[has_sis], data.mean, data.std, pred[has_sis], dilate_keep(sis[has_sis], H, W))
            stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
            rows.append({
                "selector": job.tag, "condition": TrialSpec(model_name, seed, job.key).condition.rsplit("-subset", 1)[0],
                **accuracies(job.key),
                "full_model_accuracy": evaluate(model, test_x, test_y, data.mean, data.std, keep),
                "median_confidence": float(on_subset.median()),
                "median_sis_size": stats["median_size"], "median_sis_fraction": stats["median_fraction"],
                "images_with_sis": stats["n_with_sis"],
                "dilated_median_confidence": float(dilated.median()) if len(dilated) else float("nan"),
                "forward_passes_per_image": float(np.median(sel.forward_passes)) if sel.forward_passes is not None else None,
            })
        rnd = self._selections("none", plan.random_tag, "test", len(test_x))
        keep = keep_mask(rnd.order, cfg.fraction)
        primary = self._selections(source.tag, plan.primary, "test", len(test_x))
        random_row = {
            "selector": plan.random_tag, "condition": "random", **accuracies(plan.random_key),
            "full_model_accuracy": evaluate(model, test_x, test_y, data.mean, data.std, keep),
            "median_confidence": float(class_confidence(model, test_x, data.mean, data.std, primary.pred, keep).median()),
        }
        return {"model_tag": source.tag, "selectors": rows, "random": random_row}

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
        """gallery.png (test images beside each selector's subsets, the random subset and the
        primary selector's SIS) and the plots, written to out_dir; local copies returned. The plot
        files are also listed in summary["plots"], so summary.md embeds them, and the gallery's
        column titles in summary["gallery_columns"]."""
        cfg, plan, data = self.cfg, self.plan, self.data
        m = cfg.models[0]
        source = plan.sources[m]["plain"]
        tags = [t for t in summary["selectors"]]
        sels = {t: self._selections(source.tag, t, "test") for t in tags}
        rnd = self._selections("none", plan.random_tag, "test")
        paths = self.plots(summary, sels, rnd, local_dir)
        n = min(cfg.gallery, len(data.labels["test"]))
        summary["gallery_columns"] = []  # none without a gallery
        if n:
            x = normalize(torch.from_numpy(data.images["test"][:n]), data.mean, data.std)
            pct = f"{100 * cfg.fraction:g}%"

            def shown(keep):
                return denormalize_uint8(apply_mask(x, keep), data.mean, data.std)

            panels = {f"{t} {pct}": shown(keep_mask(sels[t].order[:n], cfg.fraction)) for t in tags}
            if "road" in plan.fills:  # the primary selector's subsets as the ROAD-filled models see them
                keep = keep_mask(sels[plan.primary].order[:n], cfg.fraction)
                road = fill_removed(x, keep, "road", std=data.std, seeds=range(n))
                panels[f"{plan.primary} {pct}, ROAD fill"] = denormalize_uint8(road, data.mean, data.std)
            panels[f"random {pct}"] = shown(keep_mask(rnd.order[:n], cfg.fraction))
            primary = sels[plan.primary]
            sis = sis_mask(primary.order[:n], primary.curve[:n], primary.confidence[:n], cfg.tau)
            sis_title = f"SIS τ={cfg.tau:g} ({plan.primary})"
            panels[sis_title] = shown(sis)
            titles = [f"{data.classes[int(primary.label[i])]} → {data.classes[int(primary.pred[i])]} ({primary.confidence[i]:.2f})" for i in range(n)]
            path = os.path.join(local_dir, "gallery.png")
            save_gallery(path, denormalize_uint8(x, data.mean, data.std), panels, titles,
                         empty_labels={sis_title: (~sis.any(1)).tolist()}, tau=cfg.tau)
            paths.append(path)
            summary["gallery_columns"] = ["original", *panels]  # left to right, as gallery.png titles them
        copy_out(paths, cfg.out_dir)
        self._read.clear()  # the last reader: the selections need not outlive the summary
        return paths

    def plots(self, summary: dict, sels: dict, rnd, local_dir: str, max_images: int = 512) -> list[str]:
        """accuracy.png, confidence_vs_removed.png, sis_sizes.png (see overinterp/report/figures.py)."""
        cfg, plan, data = self.cfg, self.plan, self.data
        m = cfg.models[0]
        paths = [plot_accuracy_by_condition(summary, os.path.join(local_dir, "accuracy.png"))]
        curves = {}
        for tag, sel in sels.items():  # p(c) after t removals, t = 0..HW (the unmasked image first)
            curves[f"{tag}"] = torch.cat([sel.confidence[:, None], sel.curve], 1)[:max_images].numpy()
        # The random baseline has no curve: p(c) of the explained class at 21 removed fractions.
        n = min(max_images, len(rnd.order))
        x = torch.from_numpy(data.images["test"][:n])
        target = sels[plan.primary].pred[:n]
        model = load_ensemble(list(plan.sources[m]["plain"].checkpoints))
        fractions = np.linspace(0, 1, 21)
        random_curve = [class_confidence(model, x, data.mean, data.std, target,
                                         tail_mask(rnd.order[:n], torch.full((n,), plan.hw - int(round(f * plan.hw)))))
                        for f in fractions]
        curves["random"] = torch.stack(random_curve, 1).numpy()
        paths.append(plot_confidence_vs_removed(curves, os.path.join(local_dir, "confidence_vs_removed.png"),
                                                title=f"{m}: median p(c) as pixels are removed (test images)"))
        sizes = {}
        for variant, source in plan.sources[m].items():
            sel = self._selections(source.tag, plan.primary, "test")
            sizes[source.label] = sis_size(sel.curve, sel.confidence, cfg.tau).numpy()
        paths.append(plot_sis_size_histograms(sizes, plan.hw, os.path.join(local_dir, "sis_sizes.png"), cfg.tau))
        summary["plots"] = [os.path.basename(p) for p in paths]
        return paths


def prepare_run(config: RunConfig, ray_address: str | None = None):
    """Check the config, load the data, build the plan, connect to Ray and plan resources. Writes
    nothing to --out (the budget guard and --dry-run must leave it untouched)."""
    from overinterp.pipeline.lock import OutputLock

    config.check()
    cfg = config.resolved()
    OutputLock(cfg.out_dir).check_free()  # a live run on this --out stops us before data, Ray and calibration (reads only)
    store.validate_shards(fs.join(cfg.out_dir, "selections"))  # a corrupt shard stops us before any work (it only reads)
    refuse_other_settings(cfg, fs.join(cfg.out_dir, "config.json"))  # other settings stop us (and a dry run) before any work
    log(f"loading {cfg.dataset}{' (smoke subsample)' if cfg.smoke else ''}")
    data = load_data(cfg)
    plan = plan_small(cfg, data)
    ensure_ray(ray_address)
    resources = plan_resources(discover_capacity(), ResourceFlags(**cfg.resource_flags()))
    return cfg, data, plan, resources


def run_pipeline(config: RunConfig, ray_address: str | None = None, dry_run: bool = False) -> Optional[dict]:
    """Run (or resume) the whole pipeline; returns the summary also written to summary.json.

    First the plan: stages, resources, forward passes and an ETA from a short calibration; a plan
    over --max-hours stops here (BudgetExceeded), and so does --dry-run (returns None). The run
    holds the lock of its --out throughout (a second run on it stops at once).
    """
    import time

    t0 = time.time()
    cfg, data, plan, resources = prepare_run(config, ray_address)
    log(plan.describe())
    log(resources.describe())
    if cfg.autocast and not resources.use_gpu:
        log(f"--autocast {cfg.autocast} needs GPUs; this cluster has none, so selection runs exact fp32 on CPU")
    return run_job(cfg, plan, resources, lambda callbacks, cost: InMemoryBackend(cfg, plan, data, resources, callbacks, cost),
                   holder="overinterp run", dataset=cfg.dataset, t0=t0, dry_run=dry_run)
