"""What every run reports, whatever its data backend: accuracies by condition, SIS sizes, confidence
on masked inputs, the selector comparison, plots and the gallery (`Analysis`), and summary.json and
summary.md. The backends hand it the test images (`TestImages`); it reads the selections from the
store and evaluates the explained models on the driver's CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from overinterp import fs, store
from overinterp.data import denormalize_uint8, normalize
from overinterp.fill import fill as fill_removed
from overinterp.pipeline.plan import Plan
from overinterp.pipeline.trial import TrialSpec
from overinterp.report import accuracy_figure, confidence_figure, gallery_figure, save_figure, sis_size_figure, sis_stats
from overinterp.selection import apply_mask, keep_mask, n_keep, sis_mask, sis_size, tail_mask
from overinterp.selection.subsets import dilate_keep
from overinterp.training import class_confidence, evaluate


def accuracy_by_condition(plan: Plan, full: dict, subsets: dict) -> dict:
    """{model: {condition: [accuracy per seed, in plan.seeds order]}}."""
    out = {}
    for spec in list(plan.full_trials) + list(plan.subset_trials):
        result = (full if spec in plan.full_trials else subsets)[spec.name]
        out.setdefault(spec.model, {}).setdefault(spec.condition, {})[spec.seed] = result["accuracy"]
    return {m: {c: [v[s] for s in plan.seeds if s in v] for c, v in conds.items()} for m, conds in out.items()}


def write_summary(plan: Plan, summary: dict, local_dir: str) -> list[str]:
    """summary.json and summary.md into out_dir (path or URI); returns local copies for MLflow."""
    from overinterp.report import summary_markdown

    paths = []
    for name, text in (("summary.json", json.dumps(summary, indent=1, sort_keys=True)), ("summary.md", summary_markdown(summary))):
        paths.append(os.path.join(local_dir, name))
        with open(paths[-1], "w") as f:
            f.write(text)
    copy_out(paths, plan.out_dir)
    return paths


def copy_out(paths: list[str], out_dir: str) -> None:
    for p in paths:
        with open(p, "rb") as f:
            fs.write_bytes(fs.join(out_dir, os.path.basename(p)), f.read())


@dataclass(frozen=True)
class TestImages:
    """The test images the analysis looks at, sorted by image id: all of an in-memory data set's, or
    the first ANALYSIS_IMAGES of a streamed source's (the trained models' accuracies come from their
    trials, over the whole split, either way)."""

    image_id: np.ndarray  # (N,) int64, sorted
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    mean: tuple
    std: tuple
    classes: tuple
    total: int  # test images in the split (N <= total)


def pretrained_baseline(measured: Optional[dict], test: TestImages, full: float, own_subsets: float) -> dict:
    """A pretrained explained model's baseline, {"full", "own_subsets", "images"}: `measured` where a
    backend measured it over a test split larger than the analysed images; else its accuracies on the
    analysed images (full images and its own subsets, %), which must then be the whole split."""
    if measured is not None:
        return measured
    if len(test.labels) != test.total:
        raise ValueError(f"a pretrained model's baseline needs the whole test split ({test.total} images) or a backend's pass "
                         f"over it; the analysis has {len(test.labels)}")
    return {"full": full, "own_subsets": own_subsets, "images": len(test.labels)}


class Analysis:
    """summary.json's content beyond the trials' accuracies — SIS sizes of each explained model,
    confidence on masked inputs, the selector comparison — and the plots and the gallery, computed on
    the run's test images (TestImages) from the store. Both data backends use it as it is."""

    def __init__(self, cfg, plan: Plan, test: TestImages):
        self.cfg, self.plan, self.test = cfg, plan, test
        self._read: dict[tuple[str, str], store.Selections] = {}
        self._models: dict[str, torch.nn.Module] = {}

    def selections(self, source_tag: str, tag: str) -> store.Selections:
        """One (model, selector) of the test split, the rows of the analysed images in their order,
        read once per run: the summary, the selector table, the gallery and the plots look at the
        same rows. Shared between callers: read, never modify."""
        key = (source_tag, tag)
        if key not in self._read:  # only the analysed images' rows: a streamed split may be far bigger
            self._read[key] = store.read_selections(self.plan.root, source_tag, tag, "test", only_ids=self.test.image_id)
        return self._read[key]

    def model(self, source) -> torch.nn.Module:
        if source.tag not in self._models:
            self._models[source.tag] = source.load(torch.device("cpu"))
        return self._models[source.tag]

    def summary(self, full: dict, subsets: dict, baseline: Optional[dict], skipped) -> dict:
        """Per-seed accuracies, SIS sizes, confidence on masked inputs, the selector comparison, and
        for a pretrained explained model its baseline: `baseline` where a backend measured it over a
        test split larger than the analysed images, else (None) the analysis's own accuracies of that
        model on the analysed images, which are then the whole split."""
        cfg, plan, test = self.cfg, self.plan, self.test
        x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
        summary = {
            "dataset": cfg.dataset, "smoke": cfg.smoke, "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, plan.hw), "hw": plan.hw,
            "tau": cfg.tau, "seeds": list(cfg.seeds), "models": list(cfg.models), "selector": plan.primary,
            "selectors": list(dict.fromkeys(j.tag for j in plan.selections)),  # primary first
            "fills": list(plan.fills), "num_classes": plan.num_classes,
            "accuracy": accuracy_by_condition(plan, full, subsets), "variant_accuracy": {}, "sis": {}, "masked_confidence": {},
            "comparison": {}, "skipped_images": skipped, "analysed_test_images": [len(test.labels), test.total],
        }
        for m in cfg.models:
            summary["sis"][m], summary["variant_accuracy"][m] = {}, {}
            for variant, source in plan.sources[m].items():
                sel = self.selections(source.tag, plan.primary)
                stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
                stats.update(label=source.label, model_tag=source.tag)
                summary["sis"][m][variant] = stats
                summary["variant_accuracy"][m][variant] = evaluate(self.model(source), x, y, test.mean, test.std)
            summary["comparison"][m] = self.compare_selectors(m, summary["accuracy"].get(m, {}))
            primary_row = next(r for r in summary["comparison"][m]["selectors"] if r["selector"] == plan.primary)
            summary["masked_confidence"][m] = {"median_confidence": primary_row["median_confidence"], "accuracy": primary_row["full_model_accuracy"]}
        explained = next(iter(plan.sources[cfg.models[0]].values()))
        if explained.variant == "pretrained":  # the baseline every trained model is compared with
            m = cfg.models[0]  # every trained model's source is the one pretrained model
            summary.update(baseline=pretrained_baseline(baseline, test, summary["variant_accuracy"][m]["pretrained"],
                                                        summary["masked_confidence"][m]["accuracy"]),
                           model=cfg.pretrained, weights=cfg.weights, train_model=m, images={s: n for s, n in plan.n_images.items()})
        return summary

    def compare_selectors(self, model_name: str, accuracy: dict) -> dict:
        """One row per selector, and the random floor: accuracy of models trained on its subsets under
        each fill and on its positions alone (lists over seeds), the explained model's accuracy and
        median p(c) on those subsets (test images, mean fill), the median SIS size at tau, and the
        median p(c) once each SIS pixel's 3x3 neighbourhood is restored ("dilation")."""
        cfg, plan, test = self.cfg, self.plan, self.test
        H, W = plan.shape[1:]
        x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
        source = next(iter(plan.sources[model_name].values()))  # plain (first seed) or pretrained
        model = self.model(source)
        seed = cfg.seeds[0]

        def accuracies(key: str) -> dict:
            by_fill = {f: accuracy.get(TrialSpec(model_name, seed, key, f).condition, []) for f in plan.fills}
            return {"accuracy": by_fill, "positions": accuracy.get(TrialSpec(model_name, seed, key, "positions").condition)}

        rows = []
        for job in plan.selections:
            if job.source != source or job.split != "test":
                continue
            sel = self.selections(source.tag, job.tag)
            keep = keep_mask(sel.order, cfg.fraction)
            k = int(keep[0].sum())
            on_subset = sel.curve[:, plan.hw - k - 1] if k < plan.hw else sel.confidence
            sis = sis_mask(sel.order, sel.curve, sel.confidence, cfg.tau)
            has_sis = sis.any(1)
            pred = torch.as_tensor(sel.pred)
            dilated = class_confidence(model, x[has_sis], test.mean, test.std, pred[has_sis], dilate_keep(sis[has_sis], H, W))
            stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
            rows.append({
                "selector": job.tag, "condition": TrialSpec(model_name, seed, job.key).condition.rsplit("-subset", 1)[0],
                **accuracies(job.key),
                "full_model_accuracy": evaluate(model, x, y, test.mean, test.std, keep),
                "median_confidence": float(on_subset.median()),
                "median_sis_size": stats["median_size"], "median_sis_fraction": stats["median_fraction"],
                "images_with_sis": stats["n_with_sis"],
                "dilated_median_confidence": float(dilated.median()) if len(dilated) else float("nan"),
                "forward_passes_per_image": float(np.median(sel.forward_passes)) if sel.forward_passes is not None else None,
            })
        rnd = self.selections("none", plan.random_tag)
        keep = keep_mask(rnd.order, cfg.fraction)
        primary = self.selections(source.tag, plan.primary)
        random_row = {
            "selector": plan.random_tag, "condition": "random", **accuracies(plan.random_key),
            "full_model_accuracy": evaluate(model, x, y, test.mean, test.std, keep),
            "median_confidence": float(class_confidence(model, x, test.mean, test.std, primary.pred, keep).median()),
        }
        return {"model_tag": source.tag, "selectors": rows, "random": random_row}

    def reports(self, summary: dict, local_dir: str) -> list[str]:
        """gallery.png (test images beside each selector's subsets, the random subset and the
        primary selector's SIS) and the plots, written to out_dir; local copies returned. The plot
        files are also listed in summary["plots"], so summary.md embeds them, and the gallery's
        column titles in summary["gallery_columns"]."""
        cfg, plan, test = self.cfg, self.plan, self.test
        source = next(iter(plan.sources[cfg.models[0]].values()))
        tags = list(summary["selectors"])
        sels = {t: self.selections(source.tag, t) for t in tags}
        rnd = self.selections("none", plan.random_tag)
        paths = self.plots(summary, sels, rnd, local_dir)
        n = min(cfg.gallery, len(test.labels))
        summary["gallery_columns"] = []  # none without a gallery
        if n:
            x = normalize(torch.from_numpy(test.images[:n]), test.mean, test.std)
            pct = f"{100 * cfg.fraction:g}%"

            def shown(keep):
                return denormalize_uint8(apply_mask(x, keep), test.mean, test.std)

            panels = {f"{t} {pct}": shown(keep_mask(sels[t].order[:n], cfg.fraction)) for t in tags}
            if "road" in plan.fills:  # the primary selector's subsets as the ROAD-filled models see them
                keep = keep_mask(sels[plan.primary].order[:n], cfg.fraction)
                road = fill_removed(x, keep, "road", std=test.std, seeds=range(n))
                panels[f"{plan.primary} {pct}, ROAD fill"] = denormalize_uint8(road, test.mean, test.std)
            panels[f"random {pct}"] = shown(keep_mask(rnd.order[:n], cfg.fraction))
            primary = sels[plan.primary]
            sis = sis_mask(primary.order[:n], primary.curve[:n], primary.confidence[:n], cfg.tau)
            sis_title = f"SIS τ={cfg.tau:g} ({plan.primary})"
            panels[sis_title] = shown(sis)
            titles = [f"{test.classes[int(primary.label[i])]} → {test.classes[int(primary.pred[i])]} ({primary.confidence[i]:.2f})"
                      for i in range(n)]
            path = os.path.join(local_dir, "gallery.png")
            save_figure(gallery_figure(denormalize_uint8(x, test.mean, test.std), panels, titles,
                                       empty_labels={sis_title: (~sis.any(1)).tolist()}, tau=cfg.tau), path)
            paths.append(path)
            summary["gallery_columns"] = ["original", *panels]  # left to right, as gallery.png titles them
        copy_out(paths, cfg.out_dir)
        self._read.clear()  # the last reader: the selections need not outlive the summary
        return paths

    def plots(self, summary: dict, sels: dict, rnd, local_dir: str, max_images: int = 512) -> list[str]:
        """accuracy.png, confidence_vs_removed.png, sis_sizes.png (see overinterp/report/figures.py)."""
        cfg, plan, test = self.cfg, self.plan, self.test
        m = cfg.models[0]
        source = next(iter(plan.sources[m].values()))
        paths = [save_figure(accuracy_figure(summary), os.path.join(local_dir, "accuracy.png"))]
        # p(c) after t removals, t = 0..HW (the unmasked image first)
        curves = {tag: torch.cat([sel.confidence[:, None], sel.curve], 1)[:max_images].numpy() for tag, sel in sels.items()}
        # The random baseline has no curve: p(c) of the explained class at 21 removed fractions.
        n = min(max_images, len(rnd.order))
        x = torch.from_numpy(test.images[:n])
        target = sels[plan.primary].pred[:n]
        model = self.model(source)
        fractions = np.linspace(0, 1, 21)
        random_curve = [class_confidence(model, x, test.mean, test.std, target,
                                         tail_mask(rnd.order[:n], torch.full((n,), plan.hw - int(round(f * plan.hw)))))
                        for f in fractions]
        curves["random"] = torch.stack(random_curve, 1).numpy()
        title = f"{m}: median p(c) as pixels are removed (test images)"
        paths.append(save_figure(confidence_figure(curves, title), os.path.join(local_dir, "confidence_vs_removed.png")))
        by_label = {src.label: self.selections(src.tag, plan.primary) for src in plan.sources[m].values()}
        sizes = {label: sis_size(sel.curve, sel.confidence, cfg.tau).numpy() for label, sel in by_label.items()}
        paths.append(save_figure(sis_size_figure(sizes, plan.hw, cfg.tau), os.path.join(local_dir, "sis_sizes.png")))
        summary["plots"] = [os.path.basename(p) for p in paths]
        return paths
