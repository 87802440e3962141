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

from overinterp import fs
from overinterp.data import DataError, check_dataset_args
from overinterp.models import ModelError, check_model_name
from overinterp.selection.params import DEFAULT_EXACT_TAIL, REMOVAL_SELECTORS, selector_params
from overinterp.training import FILLS


# The user's MLflow server, read once at import: mlflow.set_tracking_uri() itself writes this variable,
# so reading it later would pick up the previous run's store in a long-lived process (tests, notebooks).
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the fix."""


@dataclass(frozen=True)
class ResourceFlags:
    """The user's resource overrides (None: planned from what the cluster can offer; see
    overinterp/pipeline/resources.py)."""

    max_workers: Optional[int] = None  # most selection actors, and most trials at once
    gpus_per_worker: Optional[float] = None  # GPUs per selection actor; 0 forces CPUs
    cpus_per_worker: Optional[float] = None
    gpus_per_trial: Optional[float] = None  # below 1: trials share a GPU (only when asked for)

    def __post_init__(self):
        for name in ("gpus_per_worker", "cpus_per_worker", "gpus_per_trial"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.max_workers is not None and self.max_workers < 1:
            raise ConfigError(f"--max-workers must be >= 1, got {self.max_workers}")
        if self.cpus_per_worker == 0 and not self.gpus_per_worker:
            raise ConfigError("--cpus-per-worker 0 needs --gpus-per-worker > 0 (a worker must ask for something)")
        for name in ("gpus_per_worker", "gpus_per_trial"):
            v = getattr(self, name)
            if v is not None and v > 1 and v != int(v):
                raise ConfigError(f"--{name.replace('_', '-')} above 1 must be a whole number, got {v}")


RESOURCE_FIELDS = tuple(ResourceFlags.__dataclass_fields__)


def _check_resource_flags(config) -> None:
    ResourceFlags(**config.resource_flags())


def _check_outputs(out_dir: str, tracking_uri: Optional[str]) -> None:
    """--out can be written, and the tracking server answers: before any work, in one line each."""
    if fs.is_uri(out_dir) and not (tracking_uri or ENV_TRACKING_URI):
        raise ConfigError(f"--out {out_dir} is remote: pass --tracking-uri (on the cluster, http://127.0.0.1:5000)")
    if tracking_uri is not None and tracking_uri.startswith("file:"):
        raise ConfigError("MLflow 3 refuses file stores: use --tracking-uri sqlite:///path/mlflow.db or http://server:5000")
    try:
        fs.check_output_dir(out_dir)
    except fs.OutputError as e:
        raise ConfigError(str(e)) from e
    check_tracking_server(tracking_uri or ENV_TRACKING_URI)


TRACKING_TIMEOUT_S = 5.0


def check_tracking_server(uri: Optional[str], timeout: float = TRACKING_TIMEOUT_S) -> None:
    """An http(s) MLflow server must answer /health within `timeout` seconds (MLflow itself would
    retry for minutes before saying anything). Other stores are checked when opened."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"the MLflow tracking server {uri} does not answer within {timeout:g} s ({reason}): start it "
                          "(`mlflow server`), open its tunnel (`ray attach cluster.yaml -p 5000`), or pass another --tracking-uri") from e


def _resolve_outputs(out_dir: str, tracking_uri: Optional[str]) -> dict:
    """out_dir made absolute (paths; URIs stay) and the tracking URI: the flag, else
    $MLFLOW_TRACKING_URI, else a SQLite file in out_dir."""
    out = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    return {"out_dir": out, "tracking_uri": tracking_uri or ENV_TRACKING_URI or f"sqlite:///{out}/mlflow.db"}


DEFAULT_MODELS = {
    "digits": ("digits_cnn",),
    "cifar10": ("resnet20", "resnet18", "vgg16_bn"),
    "cifar100": ("resnet20", "resnet18", "vgg16_bn"),
    "imagefolder": ("tv:resnet50",),
}
DEFAULT_EPOCHS = {"digits": 30, "cifar10": 200, "cifar100": 200, "imagefolder": 90}
DEFAULT_AUGMENT = {"digits": False, "cifar10": True, "cifar100": True, "imagefolder": True}
SMOKE_SIZES = (96, 48)  # train, test images kept by --smoke
# --smoke is a wiring check on any data set: small models, ImageFolder images cut to 16 px, and k
# raised until backselect/bgsis plan at most SMOKE_MAX_PASSES forward passes per image (the ranking
# selectors stay under it at these sizes: HW + their own passes). Stated in --help. What no k can
# bring under it (an exact tail of 0.5 at 16 px is 8,256 passes alone; large --selector-options) is
# refused before any work, naming the fix.
SMOKE_MAX_PASSES = 5000
SMOKE_IMAGE_SIZE = 16
SMOKE_MODELS = {"digits": ("digits_cnn",), "cifar10": ("resnet20",), "cifar100": ("resnet20",), "imagefolder": ("resnet20",)}
DATASET_SIDE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # fixed image sides; imagefolder: --image-size
# The default comparison: backward selection (the paper) against a mask-optimising and two gradient
# attribution selectors; all four finish on digits in minutes on 2 CPU cores (BENCHMARKS.md).
DEFAULT_SELECTORS = ("backselect", "perturbation", "gradient", "ig")
PIXEL_FILLS = tuple(f for f in FILLS if f != "positions")  # positions-only is a control that always runs


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
    # Pixel selectors compared on the same models; the first is the primary one (SIS sizes of the
    # mitigations, masked confidence, gallery). See overinterp/selection/__init__.py.
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    selector_options: dict = field(default_factory=dict)  # selector -> its parameters, e.g. {"ig": {"n_steps": 20}}
    pixels_per_step: int = 1  # k pixels removed per step by backselect/bgsis; backselect at k = 1 is exact
    exact_tail: float = DEFAULT_EXACT_TAIL  # F: backselect/bgsis go exact once F·HW pixels remain (1: off)
    fills: tuple[str, ...] = ("mean", "road")  # how removed pixels look to subset models (positions-only always runs too)
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
    smoke: bool = False  # tiny subsample, 2 epochs, small sizes: checks the wiring (see SMOKE_*)
    max_hours: float = 24.0  # the budget guard: refuse a run whose planned ETA is longer (0: no guard)
    gallery: int = 6  # test images pictured with their subsets
    strict: bool = False  # an image that does not decode stops the run (default: skipped and recorded)
    # resources (None: planned from what the cluster can offer, see pipeline/resources.py)
    max_workers: Optional[int] = None  # most selection actors and concurrent trials
    gpus_per_worker: Optional[float] = None  # GPUs per selection actor (0: CPUs only)
    cpus_per_worker: Optional[float] = None
    gpus_per_trial: Optional[float] = None  # fractions let trials share a GPU
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
        self.selection_params()  # names, k, F and options: one line each, before any work
        bad_fills = [f for f in self.fills if f not in PIXEL_FILLS]
        if not self.fills or bad_fills or len(set(self.fills)) != len(self.fills):
            raise ConfigError(f"--fill takes distinct values from {', '.join(PIXEL_FILLS)} (comma-separated), got {','.join(self.fills) or 'nothing'}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ConfigError(f"--autocast must be bf16 or fp16, got {self.autocast!r}")
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
        if not self.max_hours >= 0:
            raise ConfigError(f"--max-hours must be >= 0 (0 turns the budget guard off), got {self.max_hours}")
        _check_resource_flags(self)

    def selection_params(self) -> dict[str, dict]:
        """selector -> the parameters its rows are stored with; ConfigError naming the fix."""
        if not self.selectors or len(set(self.selectors)) != len(self.selectors):
            raise ConfigError(f"--selectors needs distinct selector names, got {','.join(self.selectors) or 'nothing'}")
        stray = sorted(set(self.selector_options) - set(self.selectors))
        if stray:
            raise ConfigError(f"--selector-options names {', '.join(stray)}, which --selectors does not run")
        try:
            return {name: selector_params(name, self.pixels_per_step, self.exact_tail, self.selector_options.get(name))
                    for name in self.selectors}
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check(self) -> None:
        """Names and paths: data set, its root, every model. Raises ConfigError naming the fix."""
        try:
            check_dataset_args(self.dataset, self.data_root, self.download)
            for m in self.models or DEFAULT_MODELS.get(self.dataset, ()):
                check_model_name(m)
        except (DataError, ModelError) as e:
            raise ConfigError(str(e)) from e
        _check_outputs(self.out_dir, self.tracking_uri)

    def resolved(self) -> "RunConfig":
        """A copy with data-set defaults filled in (models, epochs, augmentation, tracking URI).

        Tracking defaults to $MLFLOW_TRACKING_URI, else a SQLite file in a local out_dir.
        """
        smoke = self.smoke_settings() if self.smoke else {}
        return dataclasses.replace(
            self,
            models=tuple(self.models) or (SMOKE_MODELS if self.smoke else DEFAULT_MODELS)[self.dataset],
            epochs=self.epochs or (2 if self.smoke else DEFAULT_EPOCHS[self.dataset]),
            **smoke,
            augment=DEFAULT_AUGMENT[self.dataset] if self.augment is None else self.augment,
            **_resolve_outputs(self.out_dir, self.tracking_uri),
        )

    def smoke_settings(self) -> dict:
        """What --smoke changes beyond the subsample and the epochs: the image size of a folder and
        the k that keeps backselect/bgsis within SMOKE_MAX_PASSES forward passes per image."""
        from overinterp.selection.cost import planned_forward_passes

        out = {}
        side = DATASET_SIDE.get(self.dataset)
        if side is None:
            side = out["image_size"] = min(self.image_size or SMOKE_IMAGE_SIZE, SMOKE_IMAGE_SIZE)
        k = self.pixels_per_step
        removal = [s for s in self.selectors if s in REMOVAL_SELECTORS]
        while removal and k < side * side and max(planned_forward_passes(s, side * side, k, self.exact_tail) for s in removal) > SMOKE_MAX_PASSES:
            k *= 2
        if k != self.pixels_per_step:
            out["pixels_per_step"] = k
        self._check_smoke_passes(side, k)
        return out

    def _check_smoke_passes(self, side: int, k: int) -> None:
        """ConfigError unless every selector plans at most SMOKE_MAX_PASSES forward passes per image
        at the smoke's size and k (an exact tail, or a ranking selector's options, can exceed it
        whatever k is): the bound --help states is kept, or the run is refused before any work."""
        from overinterp.selection.cost import planned_forward_passes, planned_passes

        hw = side * side
        params = dataclasses.replace(self, pixels_per_step=k).selection_params()
        for name, p in params.items():
            passes = planned_passes(name, hw, p)[0]
            if passes <= SMOKE_MAX_PASSES:
                continue
            head = (f"--smoke keeps every selector within {SMOKE_MAX_PASSES:,} forward passes per image (see --help), but {name} plans "
                    f"{passes:,} at {side}×{side} px")
            if name in REMOVAL_SELECTORS and self.exact_tail < 1:
                fits = [j / 100 for j in range(int(self.exact_tail * 100), 0, -1)
                        if planned_forward_passes(name, hw, k, j / 100) <= SMOKE_MAX_PASSES]
                fix = f"--exact-tail {fits[0]:g} or less" if fits else "no --exact-tail"
                raise ConfigError(f"{head} with --exact-tail {self.exact_tail:g} even at k = {k}: use {fix} with --smoke, or drop --smoke")
            raise ConfigError(f"{head} with its --selector-options: give it fewer (or drop them) with --smoke, or drop --smoke")

    # Fields a rerun may change without invalidating finished work in the same out_dir.
    # Selectors and fills are among them: their work is stored under its own selector tag / trial name.
    REUSABLE_CHANGES = ("tau", "tracking_uri", "experiment", "gallery", "extra", "out_dir", "select_batch", "strict",
                        "selectors", "selector_options", "pixels_per_step", "exact_tail", "fills", "max_hours", *RESOURCE_FIELDS)

    def resource_flags(self) -> dict:
        return {k: getattr(self, k) for k in RESOURCE_FIELDS}

    def fingerprint(self) -> dict:
        """The fields that determine finished work (checkpoints, selections, trials)."""
        return {k: v for k, v in asdict(self).items() if k not in self.REUSABLE_CHANGES}


def refuse_other_settings(config: RunConfig, path: str) -> bool:
    """ConfigError if `path` (an out_dir's config.json) records other settings; True when it records
    these, False when there is none. Reads only: safe before a dry run or the budget guard."""
    if not fs.exists(path):
        return False
    fp = json.loads(json.dumps(config.fingerprint()))  # tuples -> lists, as stored
    old = fs.read_json(path)
    diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
    if diff:
        raise ConfigError(
            f"{config.out_dir} holds a run with other settings ({', '.join(diff)}): "
            "use a new --out directory, or the same settings to resume it"
        )
    return True


def check_reuse(config: RunConfig, path: str) -> None:
    """Refuse to mix work from different settings in one out_dir; record the settings otherwise."""
    if not refuse_other_settings(config, path):
        fs.write_json(path, json.loads(json.dumps(config.fingerprint())))


@dataclass(frozen=True)
class ImageNetConfig:
    """Batched Gradient SIS on an ImageNet-style data set, then training on the pixel-subsets.

    The explained model is a torchvision classifier with pretrained weights (a weights enum name such
    as "DEFAULT" / "ResNet50_Weights.IMAGENET1K_V2", or a local state_dict file); the subset models
    are trained from scratch (the paper: Inception v3 on 10% subsets reaches 71.4% top-1).
    """

    train: str  # ImageFolder split (<train>/<class>/<image>) or Parquet of encoded images; path or s3://
    val: str
    model: str = "tv:resnet50"
    weights: Optional[str] = "DEFAULT"
    num_classes: Optional[int] = None  # default: the folder's classes, or 1000 for Parquet sources
    train_model: Optional[str] = None  # architecture trained on the subsets; default: model
    image_size: int = 224  # 299 for Inception v3
    pixels_per_step: int = 100  # BGSIS k
    exact_tail: float = DEFAULT_EXACT_TAIL  # F: exact BS once F·HW pixels remain (1: BGSIS to the end)
    fraction: float = 0.1  # subsets keep the last 10% of pixels (the paper's ImageNet setting)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.1
    augment: bool = False
    workers_per_trial: int = 1  # Ray Train workers (DDP) per trial, each with --gpus-per-trial GPUs
    select_batch: int = 32
    max_images: Optional[int] = None  # per split: a pilot on the first N images
    random_seed: int = 0
    out_dir: str = "imagenet-out"
    tracking_uri: Optional[str] = None
    experiment: str = "overinterp-imagenet"
    smoke: bool = False
    strict: bool = False  # an image that does not decode stops the run (default: skipped and recorded)
    max_hours: float = 24.0  # the budget guard: refuse a run whose planned ETA is longer (0: no guard)
    max_workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None
    gpus_per_trial: Optional[float] = None

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction} (the paper uses 0.1 on ImageNet)")
        if not self.max_hours >= 0:
            raise ConfigError(f"--max-hours must be >= 0 (0 turns the budget guard off), got {self.max_hours}")
        if self.pixels_per_step < 1:
            raise ConfigError(f"--pixels-per-step must be >= 1, got {self.pixels_per_step} (the paper uses 100 at 299 px)")
        self.selection_params()
        if self.image_size < 16:
            raise ConfigError(f"--image-size must be >= 16, got {self.image_size}")
        if self.workers_per_trial < 1 or self.epochs < 1 or self.batch_size < 1 or self.select_batch < 1:
            raise ConfigError("--workers-per-trial, --epochs, --batch-size and --select-batch must be >= 1")
        _check_resource_flags(self)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct and non-empty, got {list(self.seeds)}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {self.max_images}")

    def check(self) -> None:
        """Names and paths, before any work."""
        for m in (self.model, self.train_model or self.model):
            try:
                check_model_name(m)
            except ModelError as e:
                raise ConfigError(str(e)) from e
            if not m.startswith("tv:"):
                raise ConfigError(f"{m} is a small-image model: sis_imagenet.py takes torchvision models (tv:resnet50, tv:inception_v3)")
        for flag, path in (("--train", self.train), ("--val", self.val)):
            if not fs.exists(path):
                raise ConfigError(f"{flag} {path} does not exist: give an ImageFolder split (<path>/<class>/<image>) or Parquet of encoded images")
        if self.weights and not fs.is_uri(self.weights) and ("/" in self.weights or self.weights.endswith((".pt", ".pth"))) and not os.path.isfile(self.weights):
            raise ConfigError(f"--weights {self.weights} is not a file: give a state_dict file or a torchvision weights name (DEFAULT)")
        _check_outputs(self.out_dir, self.tracking_uri)

    def selection_params(self) -> dict:
        """BGSIS's stored parameters ({"k": k}, plus {"tail": F} when F < 1); ConfigError naming the fix."""
        try:
            return selector_params("bgsis", self.pixels_per_step, self.exact_tail)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolved(self) -> "ImageNetConfig":
        return dataclasses.replace(self, train_model=self.train_model or self.model, **_resolve_outputs(self.out_dir, self.tracking_uri))

    REUSABLE_CHANGES = ("tracking_uri", "experiment", "out_dir", "select_batch", "workers_per_trial", "strict", "pixels_per_step",
                        "exact_tail", "max_hours", *RESOURCE_FIELDS)  # k and F: stored under their own selector tag

    def resource_flags(self) -> dict:
        return {k: getattr(self, k) for k in RESOURCE_FIELDS}

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.REUSABLE_CHANGES}
