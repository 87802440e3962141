"""Train and evaluate classifiers on full or pixel-masked images.

The whole split lives on the device as uint8 (N, C, H, W); each batch is normalised, masked (pixels
not kept set to 0, the mean colour) and only then augmented, so random crops and flips move the
mask with the image — the original code applied a fixed mask to an already shifted image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from overinterp.data import normalize
from overinterp.fill import FILLS as PIXEL_FILLS, fill as fill_removed


@dataclass(frozen=True)
class TrainConfig:
    """SGD settings; defaults are the paper's (200 epochs, lr x0.2 at epochs 60/120/160).

    milestones are fractions of `epochs`, so shorter runs keep the same schedule shape.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    gamma: float = 0.2
    augment: bool = False  # random crop (pad 4) + horizontal flip
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1), got {self.milestones}")


def sgd(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """The paper's recipe for `model`: SGD with Nesterov momentum and weight decay, and the
    learning rate times `gamma` at each milestone (epochs, at least 1; step the scheduler per epoch)."""
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    milestones = sorted({max(1, math.floor(m * config.epochs)) for m in config.milestones})
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=config.gamma)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4, border: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Random crop with padding and horizontal flip, per image.

    x: (B, C, H, W) normalised and already masked, so any mask moves with its image.
    border: (C,) value of the padding in normalised units: `black(mean, std)` for full images (the
        paper's RandomCrop pads the photo with black before normalising); None: 0, which is how a
        subset's removed pixels look, so the padding of a subset image is removed pixels too.
    """
    B, C, H, W = x.shape
    dev = x.device
    if border is None:
        xp = F.pad(x, (pad, pad, pad, pad))
    else:
        xp = torch.as_tensor(border, dtype=x.dtype, device=dev).view(1, C, 1, 1).repeat(B, 1, H + 2 * pad, W + 2 * pad)
        xp[:, :, pad : pad + H, pad : pad + W] = x
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen).to(dev)
    flip = (torch.rand(B, generator=gen) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(H, device=dev)  # (B, H)
    cols = ox[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def black(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """(C,) a black pixel (0 in uint8) after normalisation: -mean / std per channel."""
    return tuple(-m / s for m, s in zip(mean, std))


# How the pixels outside a subset look to a model: "mean" — 0 after normalisation, the data set's
# mean colour (the paper's masking); "road" — ROAD's noisy linear imputation from the neighbours,
# so the mask's outline stops leaking the label; "positions" — no pixel values at all, the input is
# the mask itself (1 where kept, on every channel): the control for how much a subset's layout
# alone reveals the label.
FILLS = PIXEL_FILLS + ("positions",)


def prepare(images: torch.Tensor, mean, std, keep: Optional[torch.Tensor], fill: str = "mean",
            generator: Optional[torch.Generator] = None, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float, with the pixels outside `keep` (N, HW) filled by `fill`.

    ROAD's noise comes from `generator` (training: fresh noise every epoch, reproducible from the
    seed) or from one seed per image (`seeds`, evaluation: an image's fill does not depend on its
    batch). Neither: torch's global generator.
    """
    if keep is None:
        return normalize(images, mean, std)
    if fill == "positions":
        N, C, H, W = images.shape
        return keep.view(N, 1, H, W).float().expand(N, C, H, W).contiguous()
    if fill not in PIXEL_FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    return fill_removed(normalize(images, mean, std), keep, fill, std=std, generator=generator, seeds=seeds)


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    config: TrainConfig,
    keep: Optional[torch.Tensor] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
    fill: str = "mean",
) -> list[float]:
    """Train in place with the paper's SGD recipe; returns the mean loss of each epoch.

    Args:
        images: (N, C, H, W) uint8 on the model's device; labels: (N,) int64.
        keep: optional (N, HW) bool pixel-subset mask (train on subsets); None = full images.
        on_epoch: called with (epoch, mean loss) after every epoch (progress).
        fill: how pixels outside `keep` look (see FILLS).
    """
    device = images.device
    torch.manual_seed(config.seed)  # weight init happened before; this seeds dropout
    gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed)  # ROAD fill noise, drawn on the images' device
    opt, sched = sgd(model, config)
    n = images.shape[0]
    losses = []
    model.train()
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        seen = 0
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            if len(idx) == 1 and n > 1:
                continue  # BatchNorm cannot train on one image; the shuffle drops a different one each epoch
            x = prepare(images[idx], mean, std, None if keep is None else keep[idx], fill, generator=noise_gen)
            if config.augment:
                x = augment_batch(x, gen, border=black(mean, std) if keep is None else None)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
        sched.step()
        losses.append(float(total) / seen)  # one sync per epoch
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def _batched_logits(model: nn.Module, images: torch.Tensor, mean, std, keep: Optional[torch.Tensor], batch_size: int, fill: str):
    """(slice, logits) per batch of (optionally masked) uint8 images, in eval mode."""
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        seeds = range(start, min(start + batch_size, images.shape[0]))  # ROAD noise per image index: same for any batch size
        yield sl, model(prepare(images[sl], mean, std, None if keep is None else keep[sl], fill, seeds=seeds))


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, mean, std, keep: Optional[torch.Tensor] = None, batch_size: int = 1024,
            fill: str = "mean") -> torch.Tensor:
    """(N,) predicted classes on (optionally masked) uint8 images."""
    return torch.cat([logits.argmax(1) for _, logits in _batched_logits(model, images, mean, std, keep, batch_size, fill)])


@torch.inference_mode()
def class_confidence(model: nn.Module, images: torch.Tensor, mean, std, target: torch.Tensor, keep: Optional[torch.Tensor] = None,
                     batch_size: int = 1024, fill: str = "mean") -> torch.Tensor:
    """(N,) softmax probability of class target[i] for each (optionally masked) uint8 image."""
    target = torch.as_tensor(target)
    out = [torch.softmax(logits.double(), 1).gather(1, target[sl].view(-1, 1).to(logits.device)).squeeze(1)
           for sl, logits in _batched_logits(model, images, mean, std, keep, batch_size, fill)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, keep: Optional[torch.Tensor] = None,
             fill: str = "mean") -> float:
    """Top-1 accuracy in [0, 1] on (optionally masked) images."""
    return float((predict(model, images, mean, std, keep, fill=fill) == labels).float().mean())
