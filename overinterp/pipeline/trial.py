"""One training trial: a model, a seed, what its images show (full, or a stored pixel-subset with a
fill), and input dropout.

Plain torch, no Ray: Tune calls `run_trial` in a worker, tests call it directly. A finished trial
leaves `trials/<name>/result.json` (written last, atomically) beside its checkpoint, with the
checkpoint's SHA-256; a rerun reuses it only while both read back whole, and retrains otherwise
(with a warning), so a truncated or foreign checkpoint never poisons a summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from overinterp import fs
from overinterp.models import ModelSpec, build, save_checkpoint
from overinterp.training import FILLS, TrainConfig, evaluate, train_model

log = logging.getLogger(__name__)

SHORT_SELECTOR = {"backselect": "bs"}  # condition labels: "bs-subset" reads better than "backselect-subset"


@dataclass(frozen=True)
class TrialSpec:
    model: str
    seed: int
    # "<store model tag>/<selector tag>" of the stored selections whose keep-masks this trial trains
    # and tests on (e.g. "digits_cnn-s0/backselect", "none/random-seed0"); None: full images
    subset: Optional[str] = None
    fill: str = "mean"  # how removed pixels look: mean (0 after normalisation), road, positions (the mask alone)
    input_dropout: float = 0.0

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.subset is None and self.fill != "mean":
            raise ValueError("full-image trials have no fill")
        if self.subset is not None and self.subset.count("/") != 1:
            raise ValueError(f"subset must be '<model tag>/<selector tag>', got {self.subset!r}")

    @property
    def selector_tag(self) -> Optional[str]:
        return None if self.subset is None else self.subset.split("/")[1]

    @property
    def name(self) -> str:
        drop = f"-drop{self.input_dropout:g}" if self.input_dropout else ""
        what = "full" if self.subset is None else self.selector_tag + ("" if self.fill == "mean" else f"-{self.fill}")
        return f"{path_safe(self.model)}-{what}{drop}-s{self.seed}"

    @property
    def condition(self) -> str:
        """What the trial's images show, as a reviewer reads it: full, full+dropout, bs-subset,
        bs-subset+road, bs-positions-only, random-subset, ..."""
        if self.subset is None:
            return "full+dropout" if self.input_dropout else "full"
        sel = self.selector_tag.split("-")[0]
        sel = SHORT_SELECTOR.get(sel, sel)
        if self.fill == "positions":
            return f"{sel}-positions-only"
        return f"{sel}-subset" + ("" if self.fill == "mean" else f"+{self.fill}")

    @property
    def variant(self) -> str:
        return "input-dropout" if self.input_dropout else "plain"


def path_safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def trial_dir(out_dir: str, spec: TrialSpec) -> str:
    return fs.join(out_dir, "trials", spec.name)


def result_path(out_dir: str, spec: TrialSpec) -> str:
    """trials/<name>/result.json: written last, so its presence means the trial finished."""
    return fs.join(trial_dir(out_dir, spec), "result.json")


def checkpoint_path(out_dir: str, spec: TrialSpec) -> str:
    return fs.join(trial_dir(out_dir, spec), "model.pt")


def _sha256(path: str) -> str:
    return hashlib.sha256(fs.read_bytes(path)).hexdigest()


def load_result(out_dir: str, spec: TrialSpec, verify_checkpoint: bool = True) -> Optional[dict]:
    """The finished trial's result, or None if it must (re)run: not finished, or its result or
    checkpoint does not read back whole (then a warning says why).

    verify_checkpoint: hash the whole checkpoint against the SHA-256 its result recorded (one read
    of model.pt: ~45 MB for a ResNet18, from S3 on a cluster). A stage verifies each finished trial
    once, when it decides what to run; reading the results afterwards checks only that the
    checkpoints are there."""
    path = result_path(out_dir, spec)
    if not fs.exists(path):
        return None
    try:
        result = fs.read_json(path)
        ckpt = result["checkpoint"]
        if not fs.exists(ckpt):
            raise ValueError("its checkpoint is missing")
        if verify_checkpoint and result.get("checkpoint_sha256") != _sha256(ckpt):
            raise ValueError("its checkpoint does not match the one it recorded (truncated or replaced)")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        log.warning("trial %s in %s will be retrained: %s", spec.name, out_dir, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return result


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


EpochReport = Callable[[int, float, float], None]  # (epoch, mean train loss, val accuracy) after every epoch


def run_trial(
    spec: TrialSpec,
    data: dict,
    masks: dict,
    train_config: TrainConfig,
    out_dir: str,
    device: torch.device,
    report: Optional[EpochReport] = None,
) -> dict:
    """Train one model and evaluate it on the test split under the trial's condition.

    Args:
        data: {"images": {split: (N, C, H, W) uint8}, "labels": {split: (N,)}, "mean", "std", "num_classes"}.
        masks: {subset key: {split: (N, HW) bool}} for the subset trials.
        report: called after every epoch with the epoch, its mean loss and the accuracy on the
            held-out split (the test split: no model is selected on it, it only shows progress).
    Returns:
        The result dict also written to trials/<name>/result.json.
    """
    t0 = time.time()
    images = {s: torch.from_numpy(np.array(data["images"][s])).to(device) for s in ("train", "test")}
    labels = {s: torch.from_numpy(np.array(data["labels"][s])).long().to(device) for s in ("train", "test")}
    keep = {"train": None, "test": None}
    if spec.subset is not None:
        keep = {s: torch.from_numpy(np.array(masks[spec.subset][s])).to(device) for s in ("train", "test")}
    C = images["train"].shape[1]
    model_spec = ModelSpec(spec.model, int(data["num_classes"]), C, spec.input_dropout)
    torch.manual_seed(spec.seed)  # weight init
    model = build(model_spec).to(device)
    cfg = TrainConfig(**{**asdict(train_config), "seed": spec.seed})
    # several GPUs given to this trial: split each batch across them
    runner = torch.nn.DataParallel(model) if device.type == "cuda" and torch.cuda.device_count() > 1 else model
    val_accuracies: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        val_accuracies.append(evaluate(runner, images["test"], labels["test"], data["mean"], data["std"], keep["test"], fill=spec.fill))
        report(epoch, loss, val_accuracies[-1])
        runner.train()

    losses = train_model(runner, images["train"], labels["train"], data["mean"], data["std"], cfg, keep["train"],
                         on_epoch if report is not None else None, fill=spec.fill)
    acc = evaluate(runner, images["test"], labels["test"], data["mean"], data["std"], keep["test"], fill=spec.fill)
    return save_result(out_dir, spec, model_spec, model.cpu(), t0, accuracy=acc, train_loss=losses[-1], losses=losses,
                       val_accuracies=val_accuracies, device=str(device))


def save_result(out_dir: str, spec: TrialSpec, model_spec: ModelSpec, model: torch.nn.Module, t0: float, **fields) -> dict:
    """A finished trial's model.pt, then its result.json (`fields`, the trial's name, spec, seconds since t0
    and checkpoint with its SHA-256); returns the result."""
    ckpt = checkpoint_path(out_dir, spec)
    sha256 = save_checkpoint(ckpt, model_spec, model, {"trial": asdict(spec)})
    result = {"name": spec.name, "spec": asdict(spec), **fields, "seconds": time.time() - t0, "finished_at": time.time(),
              "checkpoint": ckpt, "checkpoint_sha256": sha256}
    fs.write_json(result_path(out_dir, spec), result)  # last: its presence means finished
    return result
