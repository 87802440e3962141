"""Selector names and their parameters: the one list of selectors, their checks and their tags.

Pure Python (no torch, so configuration and planning import it cheaply); Captum is imported only to
check that a "captum:<ClassName>" names a class of captum.attr.

Selectors:
- REMOVAL_SELECTORS remove pixels step by step and take k (pixels per step), the exact tail F and
  the subset fraction whose boundary no step crosses: "backselect" (backselect.py) and "bgsis"
  (gradient.py);
- RANKING_SELECTORS rank the pixels once, then score the p(c) curve of that ranking (ranking.py):
  "perturbation" (perturbation.py) and the attribution methods "gradient", "ig", "occlusion"
  (attribution.py), whose parameters have defaults here (`check_selector_params`);
- "captum:<ClassName>": any class of captum.attr built from the forward function, a ranking
  selector too; it has no pass formula (its internal passes depend on the method);
- "random": a seeded random subset, the paper's baseline (subsets.py); it explains no model.
MODEL_SELECTORS are the named selectors that explain a model, SELECTORS every named selector (each
has a pass formula in cost.py).

Every check raises a one-line ValueError naming the fix and runs no model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Optional

REMOVAL_SELECTORS = ("backselect", "bgsis")  # remove pixels step by step (take k and the exact tail)
ATTRIBUTION_METHODS = ("gradient", "ig", "occlusion")  # attribution.py's built-in methods
RANKING_SELECTORS = ("perturbation",) + ATTRIBUTION_METHODS  # rank once, then the curve of the ranking
MODEL_SELECTORS = REMOVAL_SELECTORS + RANKING_SELECTORS  # the named selectors that explain a model
RANDOM = "random"  # the baseline: a seeded random order, no model
SELECTORS = MODEL_SELECTORS + (RANDOM,)  # every named selector; each has a pass formula (cost.py)
CAPTUM_PREFIX = "captum:"  # captum:<ClassName>, a model selector too (no pass formula)

# The exact tail stays off by default (exact BS when k = 1). BENCHMARKS.md, "Exact tail: fidelity vs
# cost" (32x32 digits): no (F, k) had >= 10x fewer passes *and* a mean 5%-subset Jaccard >= 0.95
# against exact BS — the best at >= 10x, k = 16 with F = 0.1, is 0.44 (two exact BS runs, float32
# and float64, share 0.62) — so nothing earns the default.
DEFAULT_EXACT_TAIL = 1.0

IG_METHODS = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")
DEFAULT_PARAMS = {
    "gradient": {},
    "ig": {"n_steps": 50, "method": "gausslegendre"},  # Captum's IntegratedGradients defaults
    "occlusion": {"window": 1},  # one pixel (all channels) per window: the finest ranking
}
_RESERVED = ("inputs", "target", "additional_forward_args")  # set by the selector, never by a user


def is_model_selector(name: str) -> bool:
    return name in MODEL_SELECTORS or (isinstance(name, str) and name.startswith(CAPTUM_PREFIX))


def check_selector_name(name: str) -> None:
    """One-line ValueError unless `name` is a model selector (a captum:<ClassName> must exist)."""
    if not is_model_selector(name):
        raise ValueError(f"unknown selector {name!r}: choose from {', '.join(MODEL_SELECTORS)} "
                         f"or {CAPTUM_PREFIX}<ClassName> (a class of captum.attr)")
    if name.startswith(CAPTUM_PREFIX):
        captum_class(name)


def check_selector_args(pixels_per_step, exact_tail, keep_fraction=1.0) -> None:
    """A one-line ValueError unless k is an integer >= 1, and F and the kept fraction numbers in
    (0, 1] (before any model call)."""
    k = pixels_per_step
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"--pixels-per-step must be an integer >= 1, got {k!r} (1 is exact backward selection)")
    if isinstance(exact_tail, bool) or not isinstance(exact_tail, numbers.Real) or not 0.0 < exact_tail <= 1.0:
        raise ValueError(f"--exact-tail must be in (0, 1], got {exact_tail!r} (0.1 keeps the last 10% exact; 1 turns the exact tail off)")
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) or not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {keep_fraction!r} (0.05 keeps 5% of the pixels)")


# The ranking selectors' parameters

# Sources: "authors" = Fong & Vedaldi's code (github.com/ruthcfong/perturb_explanations,
# optimize_mask.py defaults); "seed script" = jacobgil/pytorch-explain-black-box explain.py (HEAD).


@dataclass(frozen=True)
class PerturbationParams:
    """Every hyper-parameter of the meaningful-perturbation selector (perturbation.py); `asdict` is its record."""

    iterations: int = 300  # Adam steps; authors num_iters=300
    lr: float = 0.1  # Adam learning rate on the mask (mask units per step, roughly); authors and seed script
    l1_coeff: float = 0.01  # weight of mean|1 - m| over the low-res mask; seed script (authors: 1e-4 on the sum over 28x28)
    tv_coeff: float = 0.2  # weight of the total variation of the low-res mask; seed script (authors: 1e-2 on a sum)
    tv_beta: float = 3.0  # exponent of the TV term; authors and seed script
    mask_scale: int = 8  # mask side = image side / mask_scale, rounded: 28 at 224 px (authors' mask_scale=8, seed script 28x28)
    min_mask_side: int = 8  # ours: floor on the mask side (capped at the image side) so 32 px images get 8x8, 8 px images 8x8
    blur_sigma: float = 10 / 224  # Gaussian σ as a fraction of the image side: 10 px at 224 (authors' blur radius 10 at 224 px)
    min_blur_sigma: float = 1.0  # ours: floor on σ, in pixels, so small images are blurred at all (σ would be 0.36 px at 8 px)
    blur_truncate: float = 3.0  # ours: kernel radius = ceil(blur_truncate · σ) pixels (61x61 at 224 px); edges replicated
    noise_std: float = 0.2  # std of the Gaussian noise added to the perturbed input each step, in normalised units; seed script

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            want = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
                raise ValueError(f"perturbation {f.name} must be {'an int' if want is int else 'a number'}, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"perturbation {f.name} must be finite, got {value!r}")
        positive = ("iterations", "lr", "tv_beta", "mask_scale", "min_mask_side", "blur_sigma", "blur_truncate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"perturbation {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("l1_coeff", "tv_coeff", "min_blur_sigma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"perturbation {name} must be >= 0 (0 switches it off), got {getattr(self, name)!r}")
        if self.tv_beta < 1:
            raise ValueError(f"perturbation tv_beta must be >= 1 (|Δm|^β is not differentiable at 0 below 1), got {self.tv_beta}")

    @classmethod
    def from_dict(cls, params: Optional[dict]) -> "PerturbationParams":
        """From a JSON/CLI dict; unknown keys fail with the list of valid ones."""
        params = dict(params or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown perturbation parameter(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        return cls(**params)

    def geometry(self, height: int, width: int) -> dict:
        """What the fractions mean for one image size: mask side, blur σ and kernel radius per axis."""
        mask = tuple(max(round(s / self.mask_scale), min(s, self.min_mask_side)) for s in (height, width))
        sigma = tuple(max(self.blur_sigma * s, self.min_blur_sigma) for s in (height, width))
        radius = tuple(math.ceil(self.blur_truncate * s) for s in sigma)
        return {"mask": mask, "sigma": sigma, "radius": radius}


def positive_int(method: str, key: str, value) -> None:
    """One-line ValueError unless value is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method} {key} must be an int >= 1, got {value!r}")


def captum_class(method: str):
    """The captum.attr class of "captum:<ClassName>", or a one-line ValueError."""
    import captum.attr  # lazy: importing Captum takes seconds (and imports torch)

    name = method[len(CAPTUM_PREFIX):]
    cls = getattr(captum.attr, name, None) if name.isidentifier() else None
    if not (inspect.isclass(cls) and issubclass(cls, captum.attr.Attribution)):
        raise ValueError(f"unknown Captum attribution {name!r}: name a class of captum.attr, e.g. captum:InputXGradient, captum:FeatureAblation")
    required = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if [p.name for p in required] not in (["forward_func"], ["model"]):
        raise ValueError(f"captum:{name} is built from {', '.join(p.name for p in required)}, not from the model alone; choose a "
                         "class built from the forward function (layer, neuron and wrapper methods do not rank input pixels)")
    return cls


def check_selector_params(name: str, params: Optional[dict] = None) -> dict:
    """Validate a ranking selector's name and parameters; return them resolved, JSON-ready.

    Handles "perturbation" (PerturbationParams fields plus "seed"), the attribution methods and
    "captum:<ClassName>". Raises a one-line ValueError naming the fix; runs no model.
    """
    params = dict(params or {})
    try:
        json.dumps(params)
    except (TypeError, ValueError):
        raise ValueError(f"{name} parameters must be JSON values (numbers, strings, lists), got {params!r}") from None
    if name == "perturbation":
        seed = params.pop("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"perturbation seed must be an int >= 0, got {seed!r}")
        return {**dataclasses.asdict(PerturbationParams.from_dict(params)), "seed": seed}  # every field and the seed
    if name in DEFAULT_PARAMS:
        unknown = sorted(set(params) - set(DEFAULT_PARAMS[name]))
        if unknown:
            allowed = ", ".join(DEFAULT_PARAMS[name]) or "none"
            raise ValueError(f"unknown {name} parameter(s) {', '.join(unknown)}: {name} takes {allowed}")
        resolved = {**DEFAULT_PARAMS[name], **params}
        if name == "ig":
            positive_int("ig", "n_steps", resolved["n_steps"])
            if resolved["method"] not in IG_METHODS:
                raise ValueError(f"ig method must be one of {', '.join(IG_METHODS)}, got {resolved['method']!r}")
        if name == "occlusion":
            positive_int("occlusion", "window", resolved["window"])
        return resolved
    if isinstance(name, str) and name.startswith(CAPTUM_PREFIX):
        cls = captum_class(name)
        importance = params.get("importance", "signed")
        if importance not in ("signed", "abs"):
            raise ValueError(f"{name} importance must be 'signed' or 'abs', got {importance!r}")
        sig = inspect.signature(cls.attribute).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.values())
        for key in params:
            if key in _RESERVED or (key != "importance" and key not in sig and not takes_any):
                accepted = ", ".join(k for k in sig if k not in ("self",) + _RESERVED)
                raise ValueError(f"{name} does not take {key!r}: its attribute() takes {accepted} (and our 'importance')")
        return {**params, "importance": importance}
    raise ValueError(f"unknown attribution method {name!r}: choose one of {', '.join(ATTRIBUTION_METHODS)} "
                     f"or {CAPTUM_PREFIX}<ClassName> (a class of captum.attr, e.g. captum:InputXGradient)")


def selector_params(name: str, pixels_per_step: int = 1, exact_tail: float = 1.0, options: dict | None = None,
                    keep_fraction: float = 1.0) -> dict:
    """The parameters a model selector's rows are stored with (and tagged by, see selector_tag).

    backselect / bgsis: {"k": k}, plus {"tail": F} when F < 1 and {"keep": the run's --fraction}
    when it is below 1 (`options` must be empty): no k-step crosses the boundary of the subset the
    run keeps, so the subset is whole steps, chosen by the selector (see cost.fast_stops). Ranking
    selectors: their resolved parameters (defaults filled in from `options`). Validates everything
    before any model work (one-line ValueError naming the fix).
    """
    check_selector_name(name)
    if name in REMOVAL_SELECTORS:
        if options:
            raise ValueError(f"{name} takes --pixels-per-step and --exact-tail, not {', '.join(sorted(options))}")
        check_selector_args(pixels_per_step, exact_tail, keep_fraction)
        params = {"k": int(pixels_per_step)}
        if exact_tail < 1:
            params["tail"] = float(exact_tail)
        if keep_fraction < 1:
            params["keep"] = float(keep_fraction)
        return params
    return check_selector_params(name, options)


def removal_args(name: str, params: Optional[dict]) -> tuple[int, float, float]:
    """(k, F, kept fraction) from a removal selector's stored parameters ({"k": k, "tail": F,
    "keep": fraction}; 1 each when absent), checked; a one-line ValueError for any other key."""
    params = dict(params or {})
    k, tail, keep = params.pop("k", 1), params.pop("tail", 1.0), params.pop("keep", 1.0)
    if params:
        raise ValueError(f"unknown {name} parameter(s) {', '.join(sorted(params))}: {name} takes k, tail and keep")
    check_selector_args(k, tail, keep)
    return k, tail, keep


# Tags: the store names a selector's rows by its name and parameters


def _tag_value(v) -> str:
    """A parameter value as it appears in a path-safe tag: numbers and words as they are, lists
    compact; anything outside [A-Za-z0-9._,+=] becomes '_'."""
    text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._,+=]", "_", text)


def selector_tag_params(name: str, params: Optional[dict] = None) -> dict:
    """Short parameters of a ranking selector for a store tag: ig -> {"n": 50} (ig-n50),
    perturbation -> {"it": 300}, gradient and occlusion at window 1 -> {}; anything changed from
    its default is added."""
    resolved = check_selector_params(name, params)
    if name == "perturbation":  # {"it": 300}, every field changed from its default, and a seed other than 0
        default = dataclasses.asdict(PerturbationParams())
        changed = {k: v for k, v in resolved.items() if k not in ("iterations", "seed") and v != default[k]}
        return {"it": resolved["iterations"], **changed, **({"seed": resolved["seed"]} if resolved["seed"] else {})}
    if name == "ig":
        return {"n": resolved["n_steps"], **({"method": resolved["method"]} if resolved["method"] != "gausslegendre" else {})}
    if name in DEFAULT_PARAMS:
        return {k: v for k, v in resolved.items() if v != DEFAULT_PARAMS[name][k]}
    return {k: v for k, v in resolved.items() if not (k == "importance" and v == "signed")}


def selector_tag(name: str, params: dict) -> str:
    """A short, path-safe name for a selector with its parameters, so that runs never mix.

    backselect (exact), backselect-k4, backselect-k16-tail0.1, bgsis-k100, bgsis-k100-keep0.1, bgsis-k100-tail0.05,
    random-seed0, gradient, ig-n50, occlusion-window3, perturbation-it300, captum_InputXGradient.
    A tail of 1 (off) is left out, so tags of runs without an exact tail carry none; backselect
    with k = 1 is exact whatever its tail (every step removes one pixel): "backselect". The kept
    fraction is in the tag where k > 1 (backselect-k4-keep0.05): there it decides where a step ends,
    so selections made with another fraction, or with none, never mix. Ranking selectors carry their
    short parameters (`selector_tag_params`).
    """
    if name == RANDOM or name in REMOVAL_SELECTORS:
        params = {key: v for key, v in params.items() if not (key == "tail" and v == 1)
                  and not (key == "keep" and (v == 1 or params.get("k", 1) == 1))}
        if name == "backselect" and params.get("k", 1) == 1:
            return "backselect"
        return name + "".join(f"-{k}{v}" for k, v in sorted(params.items()))
    check_selector_name(name)
    short = selector_tag_params(name, params)
    return name.replace(":", "_") + "".join(f"-{k}{_tag_value(v)}" for k, v in sorted(short.items()))


def params_json(params: dict) -> str:
    """A selector's parameters as the store writes them: JSON with sorted keys."""
    return json.dumps(params, sort_keys=True)
