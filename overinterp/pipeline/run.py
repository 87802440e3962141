"""The pipeline of the paper, end to end:

1. train full-image models (model x seed, plus an input-dropout variant) — Ray Tune;
2. backward selection on every train and test image with each model's first seed, and on the test
   images with the seeds' mean ensemble and the input-dropout model — Ray Data -> Parquet;
   the seeded random baseline is written beside it;
3. train and test new models on the BS subsets, on the random subsets, and on the BS subsets'
   positions alone (the mask, no pixel values: the label-leak control) — Ray Tune;
4. compare: Table 1's shape, SIS sizes, a gallery — summary.json / summary.md / gallery.png, MLflow.

Every stage skips what the out_dir already holds, so a rerun resumes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from overinterp import fs, store
from overinterp.config import SMOKE_SIZES, RunConfig, check_reuse
from overinterp.data import ImageDataset, denormalize_uint8, load_dataset, normalize
from overinterp.models import load_checkpoint, load_ensemble
from overinterp.pipeline.resources import ensure_ray
from overinterp.pipeline.select_stage import SelectionSource, run_selection, write_random
from overinterp.pipeline.trial import TrialSpec, checkpoint_path, path_safe
from overinterp.pipeline.tune_stage import run_trials
from overinterp.report import save_gallery, sis_stats, summary_markdown
from overinterp.selection import apply_mask, keep_mask, n_keep, selector_tag, sis_mask
from overinterp.selection.backselect import EngineConfig
from overinterp.training import TrainConfig, evaluate

SPLITS = ("train", "test")
SUBSET_CONDITIONS = ("backselect", "random", "backselect_positions")


def _log(msg: str) -> None:
    print(f"[overinterp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sources(cfg: RunConfig, model: str) -> dict[str, SelectionSource]:
    """The models whose SIS we measure: plain (first seed), ensemble of all seeds, input dropout."""
    s0 = cfg.seeds[0]
    out = {"plain": SelectionSource(f"{path_safe(model)}-s{s0}", (checkpoint_path(cfg.out_dir, TrialSpec(model, s0, "full")),))}
    if len(cfg.seeds) > 1:
        ckpts = tuple(checkpoint_path(cfg.out_dir, TrialSpec(model, s, "full")) for s in cfg.seeds)
        out["ensemble"] = SelectionSource(f"{path_safe(model)}-ens{len(cfg.seeds)}", ckpts)
    if cfg.input_dropout > 0:
        spec = TrialSpec(model, s0, "full", cfg.input_dropout)
        out["input_dropout"] = SelectionSource(f"{path_safe(model)}-drop{cfg.input_dropout:g}-s{s0}", (checkpoint_path(cfg.out_dir, spec),))
    return out


def _variant_label(cfg: RunConfig, variant: str) -> str:
    return {
        "plain": f"plain (seed {cfg.seeds[0]})",
        "ensemble": f"mean ensemble of {len(cfg.seeds)}",
        "input_dropout": f"input dropout p={cfg.input_dropout:g} (seed {cfg.seeds[0]})",
    }[variant]


def load_data(cfg: RunConfig) -> ImageDataset:
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
    return data.subsample(*SMOKE_SIZES) if cfg.smoke else data


def run_pipeline(config: RunConfig, ray_address: str | None = None) -> dict:
    """Run (or resume) the whole pipeline; returns the summary also written to summary.json."""
    config.check()
    cfg = config.resolved()
    t_start = time.time()
    _log(f"loading {cfg.dataset}{' (smoke subsample)' if cfg.smoke else ''}")
    data = load_data(cfg)
    out = cfg.out_dir
    check_reuse(cfg, fs.join(out, "config.json"))
    resources = ensure_ray(ray_address)
    _log(f"Ray: {resources.cpus} CPUs, {resources.gpus} GPUs; out_dir {out}; MLflow {cfg.tracking_uri}")
    C, H, W = data.shape
    HW = H * W
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment)
    data_dict = {"images": data.images, "labels": data.labels, "mean": data.mean, "std": data.std, "num_classes": data.num_classes}
    root = fs.join(out, "selections")
    bs_tag = selector_tag(cfg.selector, {"k": cfg.pixels_per_step})
    rnd_tag = selector_tag("random", {"seed": cfg.random_seed})
    if cfg.autocast and not resources.use_gpu:
        _log(f"--autocast {cfg.autocast} needs GPUs; this cluster has none, so selection runs exact fp32 on CPU")
    engine = EngineConfig(compile=cfg.compile, autocast=cfg.autocast if resources.use_gpu else None)

    from overinterp.pipeline.tracking import Tracker  # MLflow only where tracking happens

    with Tracker(cfg, f"{cfg.dataset}-{'smoke' if cfg.smoke else 'run'}") as tracker:
        # 1. full-image models
        _log("stage 1/4: training full-image models")
        full_specs = [TrialSpec(m, s, "full") for m in cfg.models for s in cfg.seeds]
        if cfg.input_dropout > 0:
            full_specs += [TrialSpec(m, s, "full", cfg.input_dropout) for m in cfg.models for s in cfg.seeds]
        full = run_trials("full", full_specs, data_dict, {}, train_cfg, out, resources)

        # 2. selection
        _log(f"stage 2/4: selection ({bs_tag})")
        for m in cfg.models:
            for variant, source in _sources(cfg, m).items():
                for split in SPLITS if variant == "plain" else ("test",):
                    run_selection(cfg.selector, source, split, data.images[split], data.labels[split], data.mean, data.std, root,
                                   resources, cfg.pixels_per_step, engine, cfg.select_batch)
        for split in SPLITS:
            write_random(root, split, data.labels[split], HW, H, W, cfg.random_seed, cfg.select_batch)

        # 3. models on pixel-subsets
        _log(f"stage 3/4: training on {100 * cfg.fraction:g}% pixel-subsets")
        n = {s: len(data.labels[s]) for s in SPLITS}
        rnd = {s: keep_mask(store.read_selections(root, "none", rnd_tag, s, n[s]).order, cfg.fraction).numpy() for s in SPLITS}
        masks = {}
        for m in cfg.models:
            plain = _sources(cfg, m)["plain"].tag
            masks[f"{m}/backselect"] = {s: keep_mask(store.read_selections(root, plain, bs_tag, s, n[s]).order, cfg.fraction).numpy() for s in SPLITS}
            masks[f"{m}/random"] = rnd
        sub_specs = [TrialSpec(m, s, c) for m in cfg.models for s in cfg.seeds for c in SUBSET_CONDITIONS]
        subs = run_trials("subsets", sub_specs, data_dict, masks, train_cfg, out, resources)

        # 4. compare
        _log("stage 4/4: summary")
        summary = summarize(cfg, data, full, subs, root, bs_tag)
        files = write_reports(cfg, data, summary, root, bs_tag, rnd_tag)
        table = summary_markdown(summary)
        for r in list(full.values()) + list(subs.values()):
            spec = r["spec"]
            base = None
            if not (spec["condition"] == "full" and spec["input_dropout"] == 0):
                base = full[TrialSpec(spec["model"], spec["seed"], "full").name]["accuracy"]
            tracker.log_trial(r, base, asdict(train_cfg))
        tracker.log_summary(summary, files, table)
        summary["mlflow_run_id"] = tracker.run_id
    _log(f"done in {time.time() - t_start:.0f} s")
    return summary


def summarize(cfg: RunConfig, data: ImageDataset, full: dict, subs: dict, root: str, bs_tag: str) -> dict:
    """summary.json's content: per-seed accuracies, SIS sizes, confidence on masked inputs."""
    C, H, W = data.shape
    HW = H * W
    test_x = torch.from_numpy(data.images["test"])
    test_y = torch.from_numpy(data.labels["test"])
    summary = {
        "dataset": cfg.dataset, "smoke": cfg.smoke, "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, HW), "hw": HW,
        "tau": cfg.tau, "seeds": list(cfg.seeds), "models": list(cfg.models), "selector": bs_tag,
        "accuracy": {}, "variant_accuracy": {}, "sis": {}, "masked_confidence": {},
    }
    for m in cfg.models:
        summary["accuracy"][m] = {
            "full": [full[TrialSpec(m, s, "full").name]["accuracy"] for s in cfg.seeds],
            **{c: [subs[TrialSpec(m, s, c).name]["accuracy"] for s in cfg.seeds] for c in SUBSET_CONDITIONS},
        }
        summary["sis"][m], summary["variant_accuracy"][m] = {}, {}
        for variant, source in _sources(cfg, m).items():
            sel = store.read_selections(root, source.tag, bs_tag, "test", len(test_y))
            stats = sis_stats(sel.curve, sel.confidence, cfg.tau)
            stats["label"] = _variant_label(cfg, variant)
            stats["model_tag"] = source.tag
            summary["sis"][m][variant] = stats
            model = load_ensemble(list(source.checkpoints))
            summary["variant_accuracy"][m][variant] = evaluate(model, test_x, test_y, data.mean, data.std)
            if variant == "plain":
                keep = keep_mask(sel.order, cfg.fraction)
                k = n_keep(cfg.fraction, HW)
                conf_on_subset = sel.curve[:, HW - k - 1] if k < HW else sel.confidence
                summary["masked_confidence"][m] = {
                    "median_confidence": float(conf_on_subset.median()),
                    "accuracy": evaluate(model, test_x, test_y, data.mean, data.std, keep),
                }
    return summary


def write_reports(cfg: RunConfig, data: ImageDataset, summary: dict, root: str, bs_tag: str, rnd_tag: str) -> list[str]:
    """summary.json, summary.md and gallery.png, written to out_dir (path or URI).

    Returns local copies of them (in a temporary folder) for MLflow to log.
    """
    local = tempfile.mkdtemp(prefix="overinterp-report-")
    paths = [os.path.join(local, "summary.json"), os.path.join(local, "summary.md")]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(summary_markdown(summary))
    n = min(cfg.gallery, len(data.labels["test"]))
    if n > 0:
        m = cfg.models[0]
        plain = _sources(cfg, m)["plain"].tag
        sel = store.read_selections(root, plain, bs_tag, "test")
        rnd = store.read_selections(root, "none", rnd_tag, "test")
        x = normalize(torch.from_numpy(data.images["test"][:n]), data.mean, data.std)
        pct = f"{100 * cfg.fraction:g}%"
        panels = {
            f"{bs_tag} {pct} ({m})": denormalize_uint8(apply_mask(x, keep_mask(sel.order[:n], cfg.fraction)), data.mean, data.std),
            f"random {pct}": denormalize_uint8(apply_mask(x, keep_mask(rnd.order[:n], cfg.fraction)), data.mean, data.std),
            f"SIS τ={cfg.tau:g}": denormalize_uint8(apply_mask(x, sis_mask(sel.order[:n], sel.curve[:n], sel.confidence[:n], cfg.tau)), data.mean, data.std),
        }
        titles = [f"{data.classes[int(sel.label[i])]} → {data.classes[int(sel.pred[i])]} ({sel.confidence[i]:.2f})" for i in range(n)]
        gallery = os.path.join(local, "gallery.png")
        save_gallery(gallery, denormalize_uint8(x, data.mean, data.std), panels, titles)
        paths.append(gallery)
    for p in paths:
        with open(p, "rb") as f:
            fs.write_bytes(fs.join(cfg.out_dir, os.path.basename(p)), f.read())
    return paths
