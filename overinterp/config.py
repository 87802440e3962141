"""Typed configuration of a run, validated at the boundary without touching the world.

`RunConfig` is what `overinterp run` and the jobs build from their flags, for every source (the
embedded digits, CIFAR, an ImageFolder, Parquet of encoded images, local or s3://) and both data
backends (in memory or streamed); `asdict(config)` goes to MLflow unchanged. Impossible values raise
ConfigError with a message naming the fix. Checks that read files, probe servers or look at --out
live in overinterp/preflight.py and run once, before any work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from overinterp import fs
from overinterp.explain import GUIDANCE_METHODS, QUESTIONS
from overinterp.selection.params import DEFAULT_EXACT_TAIL, REMOVAL_SELECTORS, selector_params


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
        for name, low in (("max_workers", 1), ("gpus_per_worker", 0), ("cpus_per_worker", 0), ("gpus_per_trial", 0)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
            if name.startswith("gpus") and v is not None and v > 1 and v != int(v):
                raise ConfigError(f"--{name.replace('_', '-')} above 1 must be a whole number, got {v}")
        if self.cpus_per_worker == 0 and not self.gpus_per_worker:
            raise ConfigError("--cpus-per-worker 0 needs --gpus-per-worker > 0 (a worker must ask for something)")


RESOURCE_FIELDS = tuple(ResourceFlags.__dataclass_fields__)

# Data sets by name. digits and CIFAR are held in memory; an ImageFolder is held in memory or
# streamed (decided by its size, see overinterp/pipeline/driver.py); Parquet always streams.
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "parquet")
IN_MEMORY_ONLY = ("digits", "cifar10", "cifar100")
STREAMED_EXPLAIN = ("--explain on a streamed source needs --generator (a diffusers pipeline for its image size): "
                    "the built-in prior trains on data sets held in memory")
DEFAULT_MODELS = {
    "digits": ("digits_cnn",),
    "cifar10": ("resnet20", "resnet18", "vgg16_bn"),
    "cifar100": ("resnet20", "resnet18", "vgg16_bn"),
    "imagefolder": ("tv:resnet50",),
    "parquet": ("tv:resnet50",),
}
DEFAULT_EPOCHS = {"digits": 30, "cifar10": 200, "cifar100": 200, "imagefolder": 90, "parquet": 90}
SMOKE_EPOCHS = 2
DEFAULT_AUGMENT = {"digits": False, "cifar10": True, "cifar100": True, "imagefolder": True, "parquet": True}
DEFAULT_IMAGE_SIZE = 224  # ImageFolder and Parquet sources: the square crop side
MAX_IMAGE_SIZE = 1024  # px: 3 MiB a float image, a selection batch of 64 already 768 MiB
SMOKE_SIZES = (96, 48)  # train, test images kept by --smoke
# --smoke is a wiring check on any data set: small models, ImageFolder images cut to 16 px, and k
# raised until backselect/bgsis plan at most SMOKE_MAX_PASSES forward passes per image (the ranking
# selectors stay under it at these sizes: HW + their own passes). Stated in --help. What no k can
# bring under it (an exact tail of 0.5 at 16 px is 8,256 passes alone; large --selector-options) is
# refused before any work, naming the fix.
SMOKE_MAX_PASSES = 5000
SMOKE_IMAGE_SIZE = 16
SMOKE_MODELS = {"digits": ("digits_cnn",), "cifar10": ("resnet20",), "cifar100": ("resnet20",), "imagefolder": ("resnet20",),
                "parquet": ("resnet20",)}
DATASET_SIDE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # fixed image sides; other sources: --image-size
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}  # fixed classes; an ImageFolder's are its class folders
# The default comparison: backward selection (the paper) against a mask-optimising and two gradient
# attribution selectors; all four finish on digits in minutes on 2 CPU cores (BENCHMARKS.md).
DEFAULT_SELECTORS = ("backselect", "perturbation", "gradient", "ig")
PIXEL_FILLS = ("mean", "road")  # how removed pixels look to subset models; positions-only is a control that always runs


IN_MEMORY_SELECT_BATCH = 64  # images per selection call of an in-memory run (a few per worker on the digits)
# A streamed run's selection call holds about as many pixels as 32 ImageNet images at 224 px: small
# images go in larger calls, so there are fewer store shards (the driver reads every shard's ids:
# 40,037 shards of 32 8-px images per ImageNet-count split cost it ~120 MiB) and each call
# amortises its Ray Data hand-off (BENCHMARKS.md: selection 2.0x faster at 512 than at 32 images).
SELECT_PIXELS = 32 * 224 * 224
MAX_SELECT_BATCH = 1024


def streamed_select_batch(side: int) -> int:
    """Images per selection call of a streamed run at side × side pixels: 32 at 224 px, 17 at 299,
    1,024 from 39 px down; at least 8."""
    return max(8, min(MAX_SELECT_BATCH, SELECT_PIXELS // (side * side)))


@dataclass(frozen=True)
class RunConfig:
    """One run: train (or take a pretrained model) -> select pixels -> train on subsets -> compare.

    Defaults reproduce the paper's CIFAR-10 settings where they apply (5% subsets, tau 0.99, input
    dropout keep-probability 0.8); epochs/augmentation default per data set (see DEFAULT_*).
    jobs/sis_imagenet.py is a preset of the paper's ImageNet settings over the same fields.
    """

    # --- the source: a named data set, or --train/--val paths or URIs ---
    dataset: str = "digits"  # one of DATASETS; --train/--val make it imagefolder or parquet
    data_root: Optional[str] = None  # cifar*, imagefolder (<root>/train, <root>/val), parquet (<root>/train*, <root>/val*)
    train: Optional[str] = None  # an ImageFolder split (<train>/<class>/<image>) or Parquet of encoded images
    val: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None  # imagefolder/parquet: square crop side in pixels (default 224)
    num_classes: Optional[int] = None  # parquet: default 1000 (an ImageFolder's are its class folders)
    max_images: Optional[int] = None  # per split: a pilot on the first N images
    stream: Optional[bool] = None  # None: decided by the data set's size (see pipeline/driver.py)
    strict: bool = False  # an image that does not decode stops the run (default: skipped and recorded)
    # --- the models ---
    models: tuple[str, ...] = ()  # trained on full images (unless pretrained) and on subsets; empty: DEFAULT_MODELS[dataset]
    pretrained: Optional[str] = None  # explain this trained model (tv:<name>, or a registered name with --weights FILE) instead of training full-image models
    weights: Optional[str] = None  # its weights: an enum name (DEFAULT, ResNet50_Weights.IMAGENET1K_V2) or a state_dict file
    seeds: tuple[int, ...] = (0, 1, 2)
    input_dropout: float = 0.2  # p of the input-dropout variant (keep_prob 0.8)
    # --- selection ---
    # Pixel selectors compared on the same models; the first is the primary one (SIS sizes of the
    # mitigations, masked confidence, gallery). See overinterp/selection/params.py.
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    selector_options: dict = field(default_factory=dict)  # selector -> its parameters, e.g. {"ig": {"n_steps": 20}}
    pixels_per_step: int = 1  # k pixels removed per step by backselect/bgsis; backselect at k = 1 is exact
    exact_tail: float = DEFAULT_EXACT_TAIL  # F: backselect/bgsis go exact once F·HW pixels remain (1: off)
    fraction: float = 0.05  # pixel-subset size, fraction of HW in (0, 1]
    tau: float = 0.99  # SIS threshold in [0, 1]
    compile: bool = False  # torch.compile the model inside selection (pays off on large runs)
    autocast: Optional[str] = None  # "bf16"/"fp16" selection on GPUs: faster, not exact
    select_batch: Optional[int] = None  # images per selection task and Parquet shard; None: selection_batch's rule
    random_seed: int = 0  # seed of the random-subset baseline
    # --- training on subsets ---
    fills: tuple[str, ...] = ("mean", "road")  # how removed pixels look to subset models (positions-only always runs too)
    epochs: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    augment: Optional[bool] = None
    workers_per_trial: int = 1  # streamed runs: Ray Train workers (DDP) per trial, each with --gpus-per-trial (<= 1) GPUs
    # --- outputs ---
    out_dir: str = "overinterp-out"
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    experiment: str = "overinterp"
    gallery: int = 6  # test images pictured with their subsets
    # --- guided generation: what the models learned to look for (overinterp/explain) ---
    explain: tuple[str, ...] = ()  # questions among QUESTIONS (vce, disagree); empty: no explain stage
    explain_method: str = "noise"  # guidance, one of GUIDANCE_METHODS
    explain_images: int = 6  # test images turned into each other class; generated images per model pair and direction
    prior_steps: int = 800  # training steps of the diffusion prior trained on the train split
    generator: Optional[str] = None  # a diffusers pixel-space pipeline (folder or hub id) in place of the trained prior
    smoke: bool = False  # tiny subsample, 2 epochs, small sizes: checks the wiring (see SMOKE_*)
    max_hours: float = 24.0  # the budget guard: refuse a run whose planned ETA is longer (0: no guard)
    extra: dict = field(default_factory=dict)  # free-form tags logged with the run
    # --- resources (None: planned from what the cluster can offer, see pipeline/resources.py) ---
    max_workers: Optional[int] = None  # most selection actors and concurrent trials
    gpus_per_worker: Optional[float] = None  # GPUs per selection actor (0: CPUs only)
    cpus_per_worker: Optional[float] = None
    gpus_per_trial: Optional[float] = None  # fractions let trials share a GPU

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown data set {self.dataset!r}: choose one of {', '.join(DATASETS)}, or give --train and --val")
        if (self.train is None) != (self.val is None):
            raise ConfigError("--train and --val go together: give both (an ImageFolder split or Parquet of encoded images each)")
        if self.train is not None and self.dataset in IN_MEMORY_ONLY and self.dataset != "digits":
            raise ConfigError(f"--train/--val are image sources of their own: drop --dataset {self.dataset}")
        if self.stream and self.source in IN_MEMORY_ONLY:
            raise ConfigError(f"{self.source} is held in memory: --stream takes imagefolder or parquet sources (or --train/--val)")
        if self.stream is False and self.source == "parquet":
            raise ConfigError("Parquet sources always stream: drop --no-stream (or export them as an ImageFolder)")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction} (the paper uses 0.05 on CIFAR-10, 0.1 on ImageNet)")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"--tau must be in [0, 1], got {self.tau} (the paper uses 0.99)")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError(f"--input-dropout must be in [0, 1), got {self.input_dropout} (the paper uses 0.2)")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"--models must be distinct, got {','.join(self.models)}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct, got {list(self.seeds)}")
        if self.weights is not None and self.pretrained is None and not self.models:
            raise ConfigError("--weights needs the model it belongs to: --pretrained tv:<name> (or --models tv:<name>)")
        if self.pretrained is not None and not self.pretrained.startswith("tv:") and self.weights in (None, "DEFAULT"):
            raise ConfigError(f"--pretrained {self.pretrained} has no named weights: give --weights FILE (a state_dict saved from it), "
                              "or a torchvision model as tv:<name> (tv:resnet50, tv:inception_v3)")
        self.selection_params()  # names, k, F and options: one line each, before any work
        bad_fills = [f for f in self.fills if f not in PIXEL_FILLS]
        if not self.fills or bad_fills or len(set(self.fills)) != len(self.fills):
            raise ConfigError(f"--fill takes distinct values from {', '.join(PIXEL_FILLS)} (comma-separated), got {','.join(self.fills) or 'nothing'}")
        bad = [q for q in self.explain if q not in QUESTIONS]
        if bad or len(set(self.explain)) != len(self.explain):
            raise ConfigError(f"--explain takes distinct questions from {', '.join(QUESTIONS)} (comma-separated), got {','.join(self.explain)}")
        if self.explain_method not in GUIDANCE_METHODS:
            raise ConfigError(f"--explain-method must be one of {', '.join(GUIDANCE_METHODS)}, got {self.explain_method!r}")
        if self.explain and not self.generator and (self.stream or self.source == "parquet"):
            raise ConfigError(STREAMED_EXPLAIN)
        if self.generator is not None and not self.explain:
            raise ConfigError("--generator is the prior of the explain stage: add --explain vce,disagree (or drop --generator)")
        explain_settings = [f"--{f.replace('_', '-')}" for f in ("explain_method", "explain_images", "prior_steps")
                            if getattr(self, f) != RunConfig.__dataclass_fields__[f].default]
        if explain_settings and not self.explain:
            raise ConfigError(f"{', '.join(explain_settings)}: only the explain stage uses this: add --explain vce,disagree (or drop it)")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ConfigError(f"--autocast must be bf16 or fp16, got {self.autocast!r}")
        lowest = {"epochs": 1, "batch_size": 1, "select_batch": 1, "workers_per_trial": 1, "image_size": 8, "num_classes": 2,
                  "max_images": 1, "gallery": 0,
                  "explain_images": 1, "prior_steps": 1}  # image_size in pixels
        for name, low in lowest.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if (self.image_size or 0) > MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be at most {MAX_IMAGE_SIZE} px, got {self.image_size} (classifiers take 224–600; "
                              "a batch of larger images does not fit in memory)")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not self.max_hours >= 0:
            raise ConfigError(f"--max-hours must be >= 0 (0 turns the budget guard off), got {self.max_hours}")
        if self.tracking_uri is not None and (self.tracking_uri.startswith("file:")
                                              or ":" not in self.tracking_uri and self.tracking_uri not in ("databricks", "databricks-uc")):
            raise ConfigError(f"--tracking-uri {self.tracking_uri} is a file store, which MLflow 3 refuses: use "
                              "sqlite:///path/mlflow.db or http://server:5000")
        if not self.experiment.strip():
            raise ConfigError("--experiment needs a name (default: overinterp)")
        if fs.is_uri(self.out_dir) and not (self.tracking_uri or ENV_TRACKING_URI):
            raise ConfigError(f"--out {self.out_dir} is remote: pass --tracking-uri (on the cluster, http://127.0.0.1:5000)")
        ResourceFlags(**self.resource_flags())
        if (self.stream or self.source == "parquet") and (self.gpus_per_trial or 0) > 1 and self.gpus_per_worker != 0:
            g = int(self.gpus_per_trial)  # a streamed trial's Ray Train worker trains on one GPU: the others would idle
            raise ConfigError(f"--gpus-per-trial {g} on a streamed run: each Ray Train worker trains on one GPU, so {g - 1} of its {g} "
                              f"would idle: give --workers-per-trial {g * self.workers_per_trial} --gpus-per-trial 1 (DDP, a GPU per "
                              "worker; --batch-size is per worker)")

    @property
    def source(self) -> str:
        """The kind of source: a DATASETS name; --train/--val count as parquet when a path names
        a .parquet file, else as an ImageFolder (a folder of Parquet files is told apart by
        preflight, which looks at the files)."""
        if self.train is None:
            return self.dataset
        return "parquet" if self.dataset == "parquet" or self.train.rstrip("/").endswith(".parquet") else "imagefolder"

    @property
    def explained(self) -> Optional[str]:
        """The pretrained model explained in place of trained full-image models (None: train them)."""
        if self.pretrained is not None:
            return self.pretrained
        return self.models[0] if self.weights is not None and self.models else None

    def selection_batch(self, streamed: bool) -> int:
        """Images per selection call and per store shard: --select-batch, else IN_MEMORY_SELECT_BATCH
        in memory, and for a streamed run about SELECT_PIXELS pixels a call (streamed_select_batch)."""
        if self.select_batch is not None:
            return self.select_batch
        return streamed_select_batch(self.image_size or DEFAULT_IMAGE_SIZE) if streamed else IN_MEMORY_SELECT_BATCH

    def selection_params(self) -> dict[str, dict]:
        """selector -> the parameters its rows are stored with; ConfigError naming the fix."""
        if not self.selectors or len(set(self.selectors)) != len(self.selectors):
            raise ConfigError(f"--selectors needs distinct selector names, got {','.join(self.selectors) or 'nothing'}")
        stray = sorted(set(self.selector_options) - set(self.selectors))
        if stray:
            raise ConfigError(f"--selector-options names {', '.join(stray)}, which --selectors does not run")
        try:
            return {name: selector_params(name, self.pixels_per_step, self.exact_tail, self.selector_options.get(name), self.fraction)
                    for name in self.selectors}
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolved(self) -> "RunConfig":
        """A copy with the defaults filled in: the source kind, models, epochs, augmentation, image
        size, the pretrained model's weights, local paths made absolute (trials run in their own
        folders) and the tracking URI ($MLFLOW_TRACKING_URI, else a SQLite file in a local out_dir).
        Nothing is read but whether --weights names a file."""
        source = self.source
        smoke = self.smoke_settings() if self.smoke else {}
        models = tuple(self.models) or (SMOKE_MODELS if self.smoke and not self.explained else DEFAULT_MODELS)[source]
        if self.pretrained is not None and not self.models:
            models = (self.pretrained,)
        def absolute(path: Optional[str]) -> Optional[str]:  # trials and workers run in other folders
            return path if path is None or fs.is_uri(path) else os.path.abspath(path)

        out = absolute(self.out_dir)
        changes = dict(
            train=absolute(self.train), val=absolute(self.val), data_root=absolute(self.data_root),
            dataset=source,
            models=models,
            pretrained=self.explained,
            weights=(absolute(self.weights) if self.weights and os.path.isfile(self.weights) else self.weights)
            if self.weights is not None or self.pretrained is None else "DEFAULT",
            epochs=self.epochs or (SMOKE_EPOCHS if self.smoke else DEFAULT_EPOCHS[source]),
            image_size=self.image_size if source in IN_MEMORY_ONLY else (self.image_size or DEFAULT_IMAGE_SIZE),
            augment=DEFAULT_AUGMENT[source] if self.augment is None else self.augment,
            out_dir=out,
            tracking_uri=self.tracking_uri or ENV_TRACKING_URI or f"sqlite:///{out}/mlflow.db",
        )
        return dataclasses.replace(self, **{**changes, **smoke})  # --smoke's image size and k win

    def smoke_settings(self) -> dict:
        """What --smoke changes beyond the subsample and the epochs: the image size of a folder and
        the k that keeps backselect/bgsis within SMOKE_MAX_PASSES forward passes per image."""
        from overinterp.selection.cost import planned_forward_passes

        out = {}
        side = DATASET_SIDE.get(self.source)
        if side is None:
            side = out["image_size"] = min(self.image_size or SMOKE_IMAGE_SIZE, SMOKE_IMAGE_SIZE)
        k = min(self.pixels_per_step, side * side)  # a k meant for the full-size images, at the smoke's size
        removal = [s for s in self.selectors if s in REMOVAL_SELECTORS]
        while removal and k < side * side and max(planned_forward_passes(s, side * side, k, self.exact_tail, keep_fraction=self.fraction) for s in removal) > SMOKE_MAX_PASSES:
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
                        if planned_forward_passes(name, hw, k, j / 100, keep_fraction=self.fraction) <= SMOKE_MAX_PASSES]
                fix = f"--exact-tail {fits[0]:g} or less" if fits else "no --exact-tail"
                raise ConfigError(f"{head} with --exact-tail {self.exact_tail:g} even at k = {k}: use {fix} with --smoke, or drop --smoke")
            raise ConfigError(f"{head} with its --selector-options: give it fewer (or drop them) with --smoke, or drop --smoke")

    # Fields a rerun may change without invalidating finished work in the same out_dir.
    # Selectors, k, F and fills are among them: their work is stored under its own selector tag / trial name.
    REUSABLE_CHANGES = ("tau", "tracking_uri", "experiment", "gallery", "extra", "out_dir", "select_batch", "strict",
                        "selectors", "selector_options", "pixels_per_step", "exact_tail", "fills", "max_hours",
                        "workers_per_trial", "stream", "explain", "explain_method", "explain_images", "prior_steps", "generator",
                        *RESOURCE_FIELDS)  # the explain stage keeps its own record (pipeline/explain_stage.py)

    def resource_flags(self) -> dict:
        return {k: getattr(self, k) for k in RESOURCE_FIELDS}

    def fingerprint(self) -> dict:
        """The fields that determine finished work (checkpoints, selections, trials)."""
        return {k: v for k, v in asdict(self).items() if k not in self.REUSABLE_CHANGES}
