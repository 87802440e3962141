"""Batched Gradient SIS on ImageNet-style data, then models trained on the pixel-subsets.

1. images stream from a folder tree or Parquet (local or s3://) through Ray Data to GPU actors
   that run BGSIS with a pretrained torchvision model and write Parquet shards;
2. the seeded random baseline is written for the same image ids;
3. the pretrained model is evaluated on the full validation images and on its own subsets
   (the baseline every trained model is compared with);
4. Ray Tune trains the subset models (from scratch; several GPUs per trial where given) on the
   BGSIS subsets and on random subsets of the train images, tested on the same kind of subsets of
   the validation images; MLflow logs each against the baseline.

Steps 3–4 hold the decoded images in the driver's memory (`images.materialize`): fine for pilots and
ImageNet subsets, not for all 1.28M images (that needs a streaming trainer; see README).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict

import numpy as np
import ray
import torch

from overinterp import fs, store
from overinterp.config import ImageNetConfig, check_reuse
from overinterp.data import IMAGENET_MEAN, IMAGENET_STD
from overinterp.models import create_model
from overinterp.pipeline.images import is_parquet, list_classes, materialize, read_images
from overinterp.pipeline.resources import ensure_ray
from overinterp.pipeline.run import SUBSET_CONDITIONS
from overinterp.pipeline.select_stage import SelectionSource, run_selection_stream, write_random
from overinterp.pipeline.trial import TrialSpec, path_safe
from overinterp.pipeline.tune_stage import run_trials
from overinterp.report import accuracy_table
from overinterp.selection import keep_mask, n_keep, selector_tag
from overinterp.training import TrainConfig, evaluate

SPLITS = {"train": "train", "test": "val"}  # store split name -> config field


def _log(msg: str) -> None:
    print(f"[sis_imagenet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _evaluate_remote(model_kwargs: dict, data: dict, keep: np.ndarray) -> dict:
    """Top-1 of the pretrained model on full and on subset-masked validation images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(**model_kwargs).to(device).eval()
    x = torch.from_numpy(np.array(data["image"])).to(device)
    y = torch.from_numpy(np.array(data["label"])).to(device)
    return {
        "full": evaluate(model, x, y, IMAGENET_MEAN, IMAGENET_STD),
        "own_subsets": evaluate(model, x, y, IMAGENET_MEAN, IMAGENET_STD, torch.from_numpy(keep).to(device)),
    }


def run_imagenet(config: ImageNetConfig, ray_address: str | None = None) -> dict:
    """Run (or resume) the ImageNet study; returns the summary also written to summary.json."""
    config.check()
    cfg = config.resolved()
    t0 = time.time()
    check_reuse(cfg, fs.join(cfg.out_dir, "config.json"))
    resources = ensure_ray(ray_address)
    _log(f"Ray: {resources.cpus} CPUs, {resources.gpus} GPUs; out {cfg.out_dir}; MLflow {cfg.tracking_uri}")
    classes = None if is_parquet(cfg.train) else list_classes(cfg.train)
    num_classes = cfg.num_classes or (len(classes) if classes else 1000)
    model_kwargs = {"name": cfg.model, "num_classes": num_classes, "weights": cfg.weights}
    create_model(**model_kwargs)  # fail now, not in an actor, if the weights do not fit
    source = SelectionSource(tag=path_safe(cfg.model), model=model_kwargs)
    sel_tag = selector_tag("bgsis", {"k": cfg.pixels_per_step})
    rnd_tag = selector_tag("random", {"seed": cfg.random_seed})
    root = fs.join(cfg.out_dir, "selections")
    S = cfg.image_size
    HW = S * S

    from overinterp.pipeline.tracking import Tracker

    with Tracker(cfg, f"imagenet-{path_safe(cfg.model)}{'-smoke' if cfg.smoke else ''}") as tracker:
        data = {}
        for split, field in SPLITS.items():
            path = getattr(cfg, field)
            _log(f"BGSIS (k={cfg.pixels_per_step}) on {split} images of {path}")
            # decoded once into Ray's object store (spilling to disk), then read by selection and training
            ds = read_images(path, S, classes, cfg.max_images).materialize()
            run_selection_stream("bgsis", source, split, ds, root, IMAGENET_MEAN, IMAGENET_STD, resources,
                                 cfg.pixels_per_step, select_batch=cfg.select_batch)
            data[split] = materialize(ds)
            write_random(root, split, data[split]["label"], HW, S, S, cfg.random_seed, cfg.select_batch, data[split]["image_id"])

        masks = {}
        for split in SPLITS:
            ids = data[split]["image_id"]
            for cond, model_tag, tag in (("backselect", source.tag, sel_tag), ("random", "none", rnd_tag)):
                sel = store.read_selections(root, model_tag, tag, split)
                if not np.array_equal(sel.image_id, ids):
                    raise store.StoreError(f"{root}/{model_tag}/{tag}/{split} does not hold exactly the {len(ids)} source images: rerun")
                masks.setdefault(f"{cfg.train_model}/{cond}", {})[split] = keep_mask(sel.order, cfg.fraction).numpy()

        _log("evaluating the pretrained model on full and subset validation images")
        evaluate_task = ray.remote(num_gpus=1 if resources.use_gpu else 0)(_evaluate_remote)
        baseline = ray.get(evaluate_task.remote(model_kwargs, data["test"], masks[f"{cfg.train_model}/backselect"]["test"]))

        _log(f"training {cfg.train_model} on {100 * cfg.fraction:g}% subsets")
        trial_data = {
            "images": {s: data[s]["image"] for s in SPLITS}, "labels": {s: data[s]["label"] for s in SPLITS},
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": num_classes,
        }
        train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, augment=cfg.augment)
        specs = [TrialSpec(cfg.train_model, s, c) for s in cfg.seeds for c in SUBSET_CONDITIONS]
        results = run_trials("imagenet-subsets", specs, trial_data, masks, train_cfg, cfg.out_dir, resources, cfg.gpus_per_trial)
        for r in results.values():
            tracker.log_trial(r, baseline["full"], asdict(train_cfg))

        summary = {
            "model": cfg.model, "weights": cfg.weights, "train_model": cfg.train_model, "selector": sel_tag,
            "fraction": cfg.fraction, "n_keep": n_keep(cfg.fraction, HW), "hw": HW,
            "images": {s: int(len(data[s]["label"])) for s in SPLITS},
            "baseline": baseline,
            "accuracy": {cfg.train_model: {c: [results[TrialSpec(cfg.train_model, s, c).name]["accuracy"] for s in cfg.seeds]
                                           for c in SUBSET_CONDITIONS}},
        }
        table = imagenet_markdown(summary)
        local = tempfile.mkdtemp(prefix="sis_imagenet-")
        files = []
        for name, text in (("summary.json", json.dumps(summary, indent=1)), ("summary.md", table)):
            files.append(os.path.join(local, name))
            with open(files[-1], "w") as f:
                f.write(text)
            fs.write_text(fs.join(cfg.out_dir, name), text)
        tracker.log_summary(summary, files, table)
        summary["mlflow_run_id"] = tracker.run_id
    _log(f"done in {time.time() - t0:.0f} s")
    return summary


def imagenet_markdown(summary: dict) -> str:
    pct = f"{100 * summary['fraction']:g}%"
    b = summary["baseline"]
    lines = [
        f"# Overinterpretation on ImageNet-style data ({summary['images']['train']} train / {summary['images']['test']} val images)",
        "",
        f"Pretrained {summary['model']} ({summary['weights']}): top-1 {100 * b['full']:.1f}% on full validation images, "
        f"{100 * b['own_subsets']:.1f}% on its own {summary['selector']} {pct} subsets.",
        "",
        f"## {summary['train_model']} trained from scratch on {pct} pixel-subsets",
        "",
        accuracy_table({**summary, "accuracy": {m: {"full": [], **a} for m, a in summary["accuracy"].items()}}),
    ]
    return "\n".join(lines) + "\n"
