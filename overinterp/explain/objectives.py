"""What guided generation minimises. Each objective is called on a batch of images in the
classifiers' normalised units, x (B, C, H, W), and returns (B,) losses — one per image, so that
summing them for a gradient keeps the images independent. Classifiers are any modules that take
normalised images and return logits, as the project's models do; they are used in eval mode.

- VCE (visual counterfactual explanation): -log p_target(x) + λ·d(x, x_start), d the L1 or L2
  norm of the difference in normalised pixel units (L1 by default: it prefers changing few pixels);
- Disagreement (DiG-IN): -p₁(c) + p₂(c), an image that model 1 calls c and model 2 does not;
  the other direction is the same objective with the models swapped;
- ClassVisualisation: -log p_c(x).

`target` is a (B,) int64 tensor of each image's class (an int means the same for all).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("l1", "l2")


def _targets(target: int | torch.Tensor, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long, device=device)
    return t.expand(n) if t.ndim == 0 else t


def distance(x: torch.Tensor, start: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """(B,) L1 or L2 norm of x - start over all pixels and channels (in the units of x)."""
    d = (x - start).flatten(1)
    if norm == "l1":
        return d.abs().sum(1)
    if norm == "l2":
        return d.pow(2).sum(1).sqrt()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


class VCE:
    """-log p_target(x) + lam · ‖x - start‖ (norm "l1" or "l2", normalised units).

    model: the classifier to explain; target: (B,) or int class to reach; start: (B, C, H, W) the
    images being explained, normalised; lam: weight of the distance (per normalised unit; 0 turns
    the VCE into class visualisation started from the image).
    """

    name = "vce"

    def __init__(self, model: nn.Module, target: int | torch.Tensor, start: torch.Tensor, lam: float = 0.05, norm: str = "l1"):
        if norm not in NORMS:
            raise ValueError(f"VCE norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if lam < 0:
            raise ValueError(f"VCE lam must be >= 0, got {lam}")
        self.model, self.start, self.lam, self.norm = model.eval(), start, lam, norm
        self.target = _targets(target, start.shape[0], start.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(self.model(x), 1).gather(1, self.target.view(-1, 1)).squeeze(1)
        return -logp + self.lam * distance(x, self.start, self.norm)


class Disagreement:
    """-p₁(c) + p₂(c): low where model1 believes class c and model2 does not (in [-1, 1]).

    sign: (B,) direction per row, +1 as above, -1 the reverse (-p₂(c) + p₁(c)); None: +1 for all.
    """

    name = "disagreement"

    def __init__(self, model1: nn.Module, model2: nn.Module, target: int | torch.Tensor, sign: torch.Tensor | None = None):
        self.model1, self.model2, self.target, self.sign = model1.eval(), model2.eval(), torch.as_tensor(target, dtype=torch.long), sign

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = _targets(self.target.to(x.device), x.shape[0], x.device).view(-1, 1)
        p1 = F.softmax(self.model1(x), 1).gather(1, t).squeeze(1)
        p2 = F.softmax(self.model2(x), 1).gather(1, t).squeeze(1)
        return -p1 + p2 if self.sign is None else self.sign.to(x.device) * (-p1 + p2)


class ClassVisualisation:
    """-log p_c(x): an image the model calls c, as the prior draws it."""

    name = "class_visualisation"

    def __init__(self, model: nn.Module, target: int | torch.Tensor):
        self.model, self.target = model.eval(), torch.as_tensor(target, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = _targets(self.target.to(x.device), x.shape[0], x.device).view(-1, 1)
        return -F.log_softmax(self.model(x), 1).gather(1, t).squeeze(1)


def targets_of(objective, n: int) -> torch.Tensor:
    """(n,) int64 target classes of an objective's images, on the CPU."""
    return _targets(objective.target.cpu(), n, "cpu").clone()
