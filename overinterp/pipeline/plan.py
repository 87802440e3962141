"""The plan of a run, built once before any work: what is trained, selected and compared, with
every store key and every baseline.

    full-image trials  ->  selection jobs (source model x selector x split)  ->  random baseline
                       ->  subset trials (model x seed x stored selection x fill)  ->  summary

Every run, in memory or streamed, builds its Plan with `make_plan` and hands it to the driver
(pipeline/driver.py), which walks it stage by stage. A new selector or fill is a new entry here, not a new branch in the driver. The plan
imports no Ray, so `--dry-run` and the cost planner can print it before anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from overinterp import fs
from overinterp.config import ConfigError
from overinterp.pipeline.trial import TrialSpec, checkpoint_path, path_safe
from overinterp.selection import RANDOM, REMOVAL_SELECTORS, params_json, selector_tag

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SelectionSource:
    """A model to explain: one checkpoint, several averaged as a MeanEnsemble, or a registered model
    built by name (a torchvision model with its weights)."""

    tag: str  # the store's model name, e.g. digits_cnn-s0, digits_cnn-ens3, tv_resnet50
    checkpoints: tuple[str, ...] = ()
    model: Optional[dict] = None  # create_model kwargs: name, num_classes, weights
    variant: str = "plain"  # plain | ensemble | input-dropout | pretrained
    label: str = ""  # for tables: "plain (seed 0)", "mean ensemble of 3", ...

    def load(self, device):
        from overinterp.models import create_model, load_ensemble

        if self.checkpoints:
            return load_ensemble(list(self.checkpoints), device)
        return create_model(**self.model).to(device).eval()


@dataclass(frozen=True)
class SelectionJob:
    """One (source model, selector, split): rows in <root>/<source tag>/<selector tag>/<split>/."""

    source: SelectionSource
    selector: str
    params_json: str  # canonical JSON of the selector's parameters
    split: str

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    @property
    def tag(self) -> str:
        return selector_tag(self.selector, self.params)

    @property
    def key(self) -> str:
        """The subset key trials use: '<source tag>/<selector tag>'."""
        return f"{self.source.tag}/{self.tag}"


@dataclass(frozen=True)
class Plan:
    """Everything a run does, in order; see the module docstring."""

    dataset: str
    shape: tuple[int, int, int]  # (C, H, W)
    n_images: dict  # split -> images
    num_classes: int
    out_dir: str
    fraction: float
    tau: float
    models: tuple[str, ...]  # architectures trained (on full images, then on subsets)
    seeds: tuple[int, ...]
    full_trials: tuple[TrialSpec, ...]
    sources: dict  # model -> variant -> SelectionSource (the models whose selections are made)
    selections: tuple[SelectionJob, ...]
    random_params: dict  # the seeded random baseline's parameters
    subset_trials: tuple[TrialSpec, ...]
    primary: str  # selector tag whose SIS sizes and masked confidence the summary reports
    fills: tuple[str, ...] = ("mean",)
    streamed: bool = False  # ImageNet-style: images stream through Ray Data, never held whole

    @property
    def root(self) -> str:
        return fs.join(self.out_dir, "selections")

    @property
    def hw(self) -> int:
        return self.shape[1] * self.shape[2]

    @property
    def random_tag(self) -> str:
        return selector_tag(RANDOM, self.random_params)

    @property
    def random_key(self) -> str:
        return f"none/{self.random_tag}"

    def baseline_of(self, spec: TrialSpec) -> Optional[TrialSpec]:
        """The full-image trial a trial is compared with: same model and seed, no input dropout.
        None for that trial itself, and where a pretrained model is explained (it is the baseline)."""
        base = TrialSpec(spec.model, spec.seed)
        return None if spec == base or base not in self.full_trials else base

    def subset_keys(self) -> list[str]:
        return sorted({t.subset for t in self.subset_trials})

    def describe(self) -> str:
        """The stages, one line each, as printed at the start of a run (and by --dry-run)."""
        c, h, w = self.shape
        lines = [f"plan: {self.dataset}, {' + '.join(f'{n} {s}' for s, n in self.n_images.items())} images of {c}×{h}×{w}, "
                 f"{self.num_classes} classes; subsets keep {100 * self.fraction:g}% of pixels; out {self.out_dir}"]
        if self.full_trials:
            lines.append(f"  1. train {len(self.full_trials)} full-image model(s): " + ", ".join(t.name for t in self.full_trials))
        else:
            lines.append("  1. full-image model: pretrained (" + ", ".join(s.tag for v in self.sources.values() for s in v.values()) + ")")
        by_tag = {}
        for j in self.selections:
            by_tag.setdefault(j.tag, []).append(f"{j.source.tag}/{j.split}")
        for tag, where in by_tag.items():
            lines.append(f"  2. select {tag}: {', '.join(where)}")
        lines.append(f"  3. random baseline {self.random_tag} on {', '.join(self.n_images)}")
        lines.append(f"  4. train {len(self.subset_trials)} subset model(s): "
                     + ", ".join(sorted({t.condition for t in self.subset_trials})) + f" x seeds {','.join(map(str, self.seeds))}")
        lines.append("  5. compare: summary.json, summary.md, plots, MLflow")
        return "\n".join(lines)


def small_sources(out_dir: str, model: str, seeds: tuple[int, ...], input_dropout: float) -> dict[str, SelectionSource]:
    """The models whose SIS we measure: plain (first seed), ensemble of all seeds, input dropout."""
    s0 = seeds[0]
    out = {"plain": SelectionSource(f"{path_safe(model)}-s{s0}", (checkpoint_path(out_dir, TrialSpec(model, s0)),),
                                    variant="plain", label=f"plain (seed {s0})")}
    if len(seeds) > 1:
        ckpts = tuple(checkpoint_path(out_dir, TrialSpec(model, s)) for s in seeds)
        out["ensemble"] = SelectionSource(f"{path_safe(model)}-ens{len(seeds)}", ckpts, variant="ensemble",
                                          label=f"mean ensemble of {len(seeds)}")
    if input_dropout > 0:
        spec = TrialSpec(model, s0, input_dropout=input_dropout)
        out["input_dropout"] = SelectionSource(f"{path_safe(model)}-drop{input_dropout:g}-s{s0}", (checkpoint_path(out_dir, spec),),
                                               variant="input-dropout", label=f"input dropout p={input_dropout:g} (seed {s0})")
    return out


def subset_trials(models, seeds, subset_keys: list[str], fills: tuple[str, ...], random_key: str) -> list[TrialSpec]:
    """Every model x seed trained on each selection's subsets under each fill, on the positions
    alone, and on the random baseline under each fill."""
    specs = []
    for m in models:
        for s in seeds:
            for key in subset_keys[m]:
                specs += [TrialSpec(m, s, key, f) for f in fills]
                specs.append(TrialSpec(m, s, key, "positions"))
            specs += [TrialSpec(m, s, random_key, f) for f in fills]
    return specs


def make_plan(cfg, shape: tuple[int, int, int], n_images: dict, num_classes: int) -> Plan:
    """The plan of a run: cfg a resolved RunConfig, images of `shape` (C, H, W), `n_images` per split.

    Without a pretrained model, every model is trained on full images per seed (and with input
    dropout); every selector explains each model's plain (first-seed) model on train and test
    images, and the primary selector (the first) also explains the seeds' mean ensemble and the
    input-dropout model on the test images (their SIS sizes: the paper's mitigations). With a
    pretrained model (--pretrained/--weights), that model is the one explained and the baseline
    every trained model is compared with.
    """
    _, height, width = shape
    if cfg.pixels_per_step > height * width and any(s in REMOVAL_SELECTORS for s in cfg.selectors):
        raise ConfigError(f"--pixels-per-step {cfg.pixels_per_step} is more than the {height}×{width} = {height * width} pixels of an "
                          f"image: give at most {height * width}")
    params = {name: params_json(p) for name, p in cfg.selection_params().items()}
    primary = cfg.selectors[0]
    random_params = {"seed": cfg.random_seed}
    full: list[TrialSpec] = []
    if cfg.pretrained:
        source = SelectionSource(path_safe(cfg.pretrained), model={"name": cfg.pretrained, "num_classes": num_classes, "in_channels": shape[0], "weights": cfg.weights},
                                 variant="pretrained", label=f"pretrained {cfg.pretrained} ({cfg.weights})")
        sources = {m: {"pretrained": source} for m in cfg.models}
    else:
        full = [TrialSpec(m, s) for m in cfg.models for s in cfg.seeds]
        if cfg.input_dropout > 0:
            full += [TrialSpec(m, s, input_dropout=cfg.input_dropout) for m in cfg.models for s in cfg.seeds]
        sources = {m: small_sources(cfg.out_dir, m, cfg.seeds, cfg.input_dropout) for m in cfg.models}
    selections, keys = [], {}
    for m in cfg.models:
        explained = next(iter(sources[m].values()))  # plain (first seed) or pretrained
        keys[m] = []
        for name in cfg.selectors:
            for source in sources[m].values():
                if source != explained and name != primary:
                    continue
                for split in SPLITS if source == explained else ("test",):  # SIS of the mitigations: test images
                    job = SelectionJob(source, name, params[name], split)
                    if job not in selections:  # a pretrained model explained once for every trained model
                        selections.append(job)
            keys[m].append(f"{explained.tag}/{selector_tag(name, json.loads(params[name]))}")
    random_key = f"none/{selector_tag(RANDOM, random_params)}"
    fills = tuple(cfg.fills)
    dataset = cfg.dataset if cfg.train is None or cfg.data_root else f"{cfg.dataset} {cfg.train}"
    return Plan(
        dataset=dataset, shape=tuple(shape), n_images=dict(n_images), num_classes=num_classes,
        out_dir=cfg.out_dir, fraction=cfg.fraction, tau=cfg.tau, models=tuple(cfg.models), seeds=tuple(cfg.seeds),
        full_trials=tuple(full), sources=sources, selections=tuple(selections), random_params=random_params,
        subset_trials=tuple(subset_trials(cfg.models, cfg.seeds, keys, fills, random_key)),
        primary=selector_tag(primary, json.loads(params[primary])), fills=fills, streamed=bool(cfg.stream),
    )
