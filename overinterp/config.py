"""Typed configuration of a pipeline run, validated at the boundary.

`RunConfig` is what `overinterp run` and the jobs build from their flags; `asdict(config)` goes to
MLflow unchanged. Impossible values raise ConfigError with a message naming the fix, before any
work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from overinterp.data import DataError, check_dataset_args
from overinterp.models import ModelError, check_model_name


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the fix."""


DEFAULT_MODELS = {
    "digits": ("digits_cnn",),
    "cifar10": ("resnet20", "resnet18", "vgg16_bn"),
    "cifar100": ("resnet20", "resnet18", "vgg16_bn"),
    "imagefolder": ("tv:resnet50",),
}
DEFAULT_EPOCHS = {"digits": 30, "cifar10": 200, "cifar100": 200, "imagefolder": 90}
DEFAULT_AUGMENT = {"digits": False, "cifar10": True, "cifar100": True, "imagefolder": True}
SMOKE_SIZES = (96, 48)  # train, test images kept by --smoke


@dataclass(frozen=True)
class RunConfig:
    """One pipeline run: train -> backward selection -> train on subsets -> compare.

    Defaults reproduce the paper's CIFAR-10 settings where they apply (5% subsets, tau 0.99, input
    dropout keep-probability 0.8); epochs/augmentation default per data set (see DEFAULT_*).
    """

    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None  # imagefolder only: square crop side in pixels
    models: tuple[str, ...] = ()  # empty: DEFAULT_MODELS[dataset]
    seeds: tuple[int, ...] = (0, 1, 2)
    fraction: float = 0.05  # pixel-subset size, fraction of HW in (0, 1]
    tau: float = 0.99  # SIS threshold in [0, 1]
    input_dropout: float = 0.2  # p of the input-dropout variant (keep_prob 0.8)
    selector: str = "backselect"  # backselect (exact at k = 1) or bgsis (Batched Gradient SIS)
    pixels_per_step: int = 1  # k pixels removed per selection step; backselect at k = 1 is exact
    compile: bool = False  # torch.compile the model inside selection (pays off on large runs)
    autocast: Optional[str] = None  # "bf16"/"fp16" selection on GPUs: faster, not exact
    random_seed: int = 0  # seed of the random-subset baseline
    epochs: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    augment: Optional[bool] = None
    select_batch: int = 64  # images per selection task (and per Parquet shard)
    out_dir: str = "overinterp-out"
    tracking_uri: Optional[str] = None  # default: sqlite:///<out_dir>/mlflow.db
    experiment: str = "overinterp"
    smoke: bool = False  # tiny subsample, 2 epochs: checks the wiring in seconds
    gallery: int = 6  # test images pictured with their subsets
    extra: dict = field(default_factory=dict)  # free-form tags logged with the run

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction} (the paper uses 0.05)")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"--tau must be in [0, 1], got {self.tau} (the paper uses 0.99)")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError(f"--input-dropout must be in [0, 1), got {self.input_dropout} (the paper uses 0.2)")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct, got {list(self.seeds)}")
        if self.selector not in ("backselect", "bgsis"):
            raise ConfigError(f"--selector must be backselect or bgsis, got {self.selector!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ConfigError(f"--autocast must be bf16 or fp16, got {self.autocast!r}")
        if self.pixels_per_step < 1:
            raise ConfigError(f"--pixels-per-step must be >= 1, got {self.pixels_per_step}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.select_batch < 1:
            raise ConfigError("--batch-size and --select-batch must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8 pixels, got {self.image_size}")
        if self.gallery < 0:
            raise ConfigError(f"--gallery must be >= 0, got {self.gallery}")

    def check(self) -> None:
        """Names and paths: data set, its root, every model. Raises ConfigError naming the fix."""
        try:
            check_dataset_args(self.dataset, self.data_root, self.download)
            for m in self.models or DEFAULT_MODELS.get(self.dataset, ()):
                check_model_name(m)
        except (DataError, ModelError) as e:
            raise ConfigError(str(e)) from e
        if self.tracking_uri is not None and self.tracking_uri.startswith("file:"):
            raise ConfigError("MLflow 3 refuses file stores: use --tracking-uri sqlite:///path/mlflow.db or http://server:5000")

    def resolved(self) -> "RunConfig":
        """A copy with data-set defaults filled in (models, epochs, augmentation, tracking URI)."""
        out = os.path.abspath(self.out_dir) if "://" not in self.out_dir else self.out_dir
        return dataclasses.replace(
            self,
            models=tuple(self.models) or DEFAULT_MODELS[self.dataset],
            epochs=self.epochs or (2 if self.smoke else DEFAULT_EPOCHS[self.dataset]),
            augment=DEFAULT_AUGMENT[self.dataset] if self.augment is None else self.augment,
            out_dir=out,
            tracking_uri=self.tracking_uri or f"sqlite:///{out}/mlflow.db",
        )

    # Fields a rerun may change without invalidating finished work in the same out_dir.
    REUSABLE_CHANGES = ("tau", "tracking_uri", "experiment", "gallery", "extra", "out_dir", "select_batch")

    def fingerprint(self) -> dict:
        """The fields that determine finished work (checkpoints, selections, trials)."""
        return {k: v for k, v in asdict(self).items() if k not in self.REUSABLE_CHANGES}


def check_reuse(config: RunConfig, path: str) -> None:
    """Refuse to mix work from different settings in one out_dir; record the settings otherwise."""
    fp = json.loads(json.dumps(config.fingerprint()))  # tuples -> lists, as stored
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ConfigError(
                f"{os.path.dirname(path)} holds a run with other settings ({', '.join(diff)}): "
                "use a new --out directory, or the same settings to resume it"
            )
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(fp, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
