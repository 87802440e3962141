"""Models by name, the mean ensemble, input dropout, and checkpoints.

Every model takes normalised images (N, C, H, W) and returns logits (N, K).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from overinterp import fs
from overinterp.models.cifar import CIFAR_MODELS, DigitsCNN

SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {"digits_cnn": DigitsCNN, **CIFAR_MODELS}  # called with num_classes=, in_channels=
TORCHVISION_PREFIX = "tv:"


class ModelError(ValueError):
    """Unknown model name or unusable weights; the message names the fix."""


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def model_names() -> list[str]:
    """Every name `create_model` accepts: the small models and `tv:<torchvision classifier>`."""
    return list(SMALL_MODELS) + [TORCHVISION_PREFIX + n for n in _torchvision_names()]


def check_model_name(name: str) -> None:
    if name in SMALL_MODELS:
        return
    if name.startswith(TORCHVISION_PREFIX) and name[len(TORCHVISION_PREFIX):] in _torchvision_names():
        return
    raise ModelError(
        f"unknown model {name!r}: choose one of {', '.join(SMALL_MODELS)}, "
        f"or a torchvision classifier as tv:<name> (e.g. tv:resnet50, tv:inception_v3)"
    )


def create_model(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    """Build a model by registered name.

    Args:
        name: a key of SMALL_MODELS, or "tv:<name>" for any torchvision classification model.
        weights: a local file holding a state_dict (what users without internet have), or for
            torchvision models a weights enum name ("ResNet50_Weights.IMAGENET1K_V2", "DEFAULT").
    """
    check_model_name(name)
    if name in SMALL_MODELS:
        model = SMALL_MODELS[name](num_classes=num_classes, in_channels=in_channels)
        if weights is not None and not os.path.isfile(weights):
            raise ModelError(f"{name} has no named weights: give --weights a state_dict file saved from it, or drop --weights")
        return model if weights is None else _load_state_dict(model, weights, name, num_classes)
    import torchvision.models as tvm

    tv_name = name[len(TORCHVISION_PREFIX):]
    if in_channels != 3:
        raise ModelError(f"{name} expects 3-channel images, got {in_channels}: use a small model for this data set")
    kwargs = {"aux_logits": False, "init_weights": False} if tv_name in ("inception_v3", "googlenet") else {}
    if weights is None or os.path.isfile(weights):
        model = tvm.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        return model if weights is None else _load_state_dict(model, weights, name, num_classes)
    try:
        enum = tvm.get_weight(weights) if "." in weights else tvm.get_model_weights(tv_name)[weights]
    except (KeyError, ValueError, AttributeError) as e:
        raise ModelError(f"--weights {weights!r} is neither a file nor a torchvision weights name for {tv_name}") from e
    own = tvm.get_model_weights(tv_name)
    if type(enum) is not own:  # ResNet50_Weights.* for a resnet18 would load and fail, or download for nothing
        raise ModelError(f"--weights {weights} are {type(enum).__name__}, not {tv_name}'s: give one of {own.__name__}'s "
                         f"({', '.join(w.name for w in own)}) or DEFAULT")
    if num_classes != len(enum.meta["categories"]):
        n = len(enum.meta["categories"])
        raise ModelError(f"--weights {weights} ({enum}) predict {n} classes, the data set has {num_classes}: give --weights a "
                         f"state_dict file of {tv_name} trained on these {num_classes} classes, or a data set of those {n} classes")
    return _torchvision_pretrained(tvm, tv_name, enum)


def _load_state_dict(model: nn.Module, weights: str, name: str, num_classes: int) -> nn.Module:
    """model with the state_dict in the file `weights` (a bare state_dict, or a dict holding one
    under "state_dict", as overinterp's checkpoints do); ModelError naming the fix otherwise."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:  # not a torch file, or one holding more than tensors (an unpickling error)
        # torch's own text advises weights_only=False, which would run the file's code: not repeated
        raise ModelError(f"--weights {weights} is not a state_dict file torch can load safely ({type(e).__name__}): "
                         "save model.state_dict() with torch.save") from e
    if not isinstance(state, dict):
        raise ModelError(f"--weights {weights} holds a {type(state).__name__}, not a state_dict: save model.state_dict() with torch.save")
    state = state.get("state_dict", state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]  # BatchNorm fills these in
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        def few(keys: list) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        found = "; ".join(part for part in (f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                                            f"other shapes for {few(wrong)}" if wrong else "") if part)
        raise ModelError(f"--weights {weights} does not fit {name} with {num_classes} classes ({found}): give the state_dict of a "
                         f"{name} with {num_classes} classes (torch.save(model.state_dict(), FILE))")
    model.load_state_dict(state, strict=False)  # strict in all but num_batches_tracked, checked above
    return model


def _torchvision_pretrained(tvm, tv_name: str, enum) -> nn.Module:
    """A torchvision model with its named weights, loaded without unpickling code.

    torchvision's builders load named weights through torch.hub with weights_only=False, so a file
    planted in $TORCH_HOME/hub/checkpoints would run code. Here the model is built with weights=None
    and the kwargs its builder sets when weights are given (torchvision 0.29: inception_v3 and
    googlenet, vit_*, maxvit), and the file is loaded with weights_only=True. check_hash verifies the
    file's hash prefix only when torch.hub downloads it; a cached file is trusted for its content
    (weights_only makes that safe) but not checked again.
    """
    from urllib.error import URLError
    from urllib.parse import urlparse

    kwargs: dict = {"num_classes": len(enum.meta["categories"])}
    aux = tv_name in ("inception_v3", "googlenet")
    if aux:  # the pretrained files hold the auxiliary heads; they are dropped after loading, as torchvision does
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif tv_name.startswith("vit_"):
        kwargs["image_size"] = enum.meta["min_size"][0]
    elif tv_name.startswith("maxvit"):
        kwargs["input_size"] = enum.meta["min_size"]
    model = tvm.get_model(tv_name, weights=None, **kwargs)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(enum.url).path))
    try:
        state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", check_hash=True, weights_only=True)
    except (URLError, OSError) as e:
        raise ModelError(f"cannot download the weights {enum} from {enum.url} ({type(e).__name__}): "
                         f"put the file at {cached}, or pass --weights a local state_dict file") from e
    except Exception as e:  # an unpickling error (a file holding more than tensors) or a damaged file
        raise ModelError(f"the cached weights {cached} are not a state_dict torch can load safely "
                         f"({type(e).__name__}): delete the file so that it is downloaded again") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"the cached weights {cached} do not fit {tv_name}: {str(e).splitlines()[0]}: "
                         f"delete the file so that it is downloaded again") from e
    if aux:
        model.aux_logits = False
        if tv_name == "inception_v3":
            model.AuxLogits = None
        else:
            model.aux1 = model.aux2 = None
    return model


class InputDropout(nn.Module):
    """Drops whole pixels (all channels set to 0 = the mean colour) with probability p in training.

    Unlike nn.Dropout nothing is rescaled: a dropped pixel is exactly a masked pixel, the
    distribution BS and pixel-subset inputs live in. At evaluation it is the identity — the model is
    deterministic, so backward selection on it is well defined. (The original code kept dropout on
    at evaluation and averaged samples, which made predictions and BS random.)
    """

    def __init__(self, model: nn.Module, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"input dropout p must be in [0, 1), got {p}")
        self.model, self.p = model, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            keep = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) >= self.p  # (N, 1, H, W)
            x = x * keep
        return self.model(x)


class MeanEnsemble(nn.Module):
    """Mean of the members' logits (each member trained with its own seed)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a trained model from its checkpoint."""

    name: str
    num_classes: int
    in_channels: int
    input_dropout: float = 0.0


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter's device; CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def build(spec: ModelSpec) -> nn.Module:
    model = create_model(spec.name, spec.num_classes, spec.in_channels)
    return InputDropout(model, spec.input_dropout) if spec.input_dropout > 0 else model


def save_checkpoint(path: str, spec: ModelSpec, model: nn.Module, extra: dict | None = None) -> str:
    """Atomic write to a path or URI: a crash never leaves a half-written checkpoint behind. Returns
    the SHA-256 (hex) of the bytes written, from memory: a checkpoint on S3 is not read back."""
    buf = io.BytesIO()
    torch.save({"spec": asdict(spec), "state_dict": model.state_dict(), "extra": extra or {}}, buf)
    fs.write_bytes(path, buf.getvalue())
    return hashlib.sha256(buf.getbuffer()).hexdigest()


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model saved by save_checkpoint (path or URI), in eval mode."""
    blob = torch.load(io.BytesIO(fs.read_bytes(path)), map_location=device, weights_only=True)
    model = build(ModelSpec(**blob["spec"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def load_ensemble(paths: list[str], device: str | torch.device = "cpu") -> nn.Module:
    """One checkpoint -> that model; several -> their MeanEnsemble."""
    models = [load_checkpoint(p, device) for p in paths]
    return models[0] if len(models) == 1 else MeanEnsemble(models).eval()
