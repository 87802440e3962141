"""One training trial: a model, a seed, a condition (full / backselect / random), input dropout.

Plain torch, no Ray: Tune calls `run_trial` in a worker, tests call it directly. Finished trials
leave `trials/<name>/result.json` (written last, atomically) beside their checkpoint, so a rerun
skips them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from overinterp import fs
from overinterp.models import ModelSpec, build, save_checkpoint
from overinterp.training import TrainConfig, evaluate, train_model

# backselect_positions: the BS mask's positions alone, no pixel values (the label-leak control)
CONDITIONS = ("full", "backselect", "random", "backselect_positions")


@dataclass(frozen=True)
class TrialSpec:
    model: str
    seed: int
    condition: str  # one of CONDITIONS: what every train and test image shows the model
    input_dropout: float = 0.0

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")

    @property
    def name(self) -> str:
        drop = f"-drop{self.input_dropout:g}" if self.input_dropout else ""
        return f"{path_safe(self.model)}-{self.condition}{drop}-s{self.seed}"

    @property
    def mask_key(self) -> Optional[str]:
        """Key of this trial's masks in the masks dict (None: full images)."""
        return None if self.condition == "full" else f"{self.model}/{self.condition.removesuffix('_positions')}"

    @property
    def positions_only(self) -> bool:
        return self.condition.endswith("_positions")


def path_safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def trial_dir(out_dir: str, spec: TrialSpec) -> str:
    return fs.join(out_dir, "trials", spec.name)


def checkpoint_path(out_dir: str, spec: TrialSpec) -> str:
    return fs.join(trial_dir(out_dir, spec), "model.pt")


def load_result(out_dir: str, spec: TrialSpec) -> Optional[dict]:
    """The finished trial's result, or None if it has not finished."""
    path = fs.join(trial_dir(out_dir, spec), "result.json")
    return fs.read_json(path) if fs.exists(path) else None


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


def run_trial(
    spec: TrialSpec,
    data: dict,
    masks: dict,
    train_config: TrainConfig,
    out_dir: str,
    device: Optional[torch.device] = None,
    on_epoch=None,
) -> dict:
    """Train one model and evaluate it on the test split under the trial's condition.

    Args:
        data: {"images": {split: (N, C, H, W) uint8}, "labels": {split: (N,)}, "mean", "std", "num_classes"}.
        masks: {mask_key: {split: (N, HW) bool}} for the subset conditions.
    Returns:
        The result dict also written to trials/<name>/result.json.
    """
    device = device or pick_device()
    t0 = time.time()
    images = {s: torch.from_numpy(np.array(data["images"][s])).to(device) for s in ("train", "test")}
    labels = {s: torch.from_numpy(np.array(data["labels"][s])).long().to(device) for s in ("train", "test")}
    keep = {"train": None, "test": None}
    if spec.mask_key is not None:
        keep = {s: torch.from_numpy(np.array(masks[spec.mask_key][s])).to(device) for s in ("train", "test")}
    C = images["train"].shape[1]
    model_spec = ModelSpec(spec.model, int(data["num_classes"]), C, spec.input_dropout)
    torch.manual_seed(spec.seed)  # weight init
    model = build(model_spec).to(device)
    cfg = TrainConfig(**{**asdict(train_config), "seed": spec.seed})
    # several GPUs given to this trial (--gpus-per-trial): split each batch across them
    runner = torch.nn.DataParallel(model) if device.type == "cuda" and torch.cuda.device_count() > 1 else model
    losses = train_model(runner, images["train"], labels["train"], data["mean"], data["std"], cfg, keep["train"], on_epoch,
                         positions_only=spec.positions_only)
    acc = evaluate(runner, images["test"], labels["test"], data["mean"], data["std"], keep["test"], positions_only=spec.positions_only)
    ckpt = checkpoint_path(out_dir, spec)
    save_checkpoint(ckpt, model_spec, model.cpu(), {"trial": asdict(spec)})
    result = {
        "name": spec.name,
        "spec": asdict(spec),
        "accuracy": acc,
        "train_loss": losses[-1],
        "seconds": time.time() - t0,
        "device": str(device),
        "checkpoint": ckpt,
    }
    fs.write_json(fs.join(trial_dir(out_dir, spec), "result.json"), result)  # last: its presence means finished
    return result
