"""How good guided images are, measured without pretrained feature networks.

- target_probability / vce_success: does the classifier give the target class p ≥ 0.9 (a VCE's
  success), and distance: how far each image moved from its start (normalised pixel units);
- transfer: of the VCEs that succeed against model A, the fraction that model B (trained
  independently) also classifies as the target — a VCE that transfers changed something both
  models read, one that does not is closer to an adversarial example of A;
- pgd_counterfactual: the pixel-space baseline, targeted projected gradient descent (Madry et al.)
  in an L2 or L∞ ball, step for step the algorithm of torchattacks' PGD and PGDL2 (the tests check
  them against each other where torchattacks is installed; it is not a dependency because every
  torchattacks release pins requests~=2.25.1, which the test extra's moto cannot install with);
  pgd_at_success_rate: the smallest radius of a grid at which it succeeds as often as a VCE did;
- frechet_distance on penultimate_features: FID's formula on the features of a classifier trained
  here on real images;
- discriminator_accuracy: a tiny CNN trained to tell real from generated images on half of each,
  tested on the other half: 0.5 means indistinguishable, 1.0 trivially told apart.

Images are uint8 (N, C, H, W) throughout; classifiers take normalised images (pixels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from overinterp.explain.objectives import distance as _distance
from overinterp.explain.pixels import channel_stats, uint8_to_classifier
from overinterp.models import create_model, device_of

PGD_NORMS = ("l2", "linf")


def on_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images moved to the model's device (a CPU tensor of results may meet a model on a GPU)."""
    return images.to(device_of(model))


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 1024) -> torch.Tensor:
    """(N, classes) float64 softmax of a uint8 batch, on the CPU ((0, 0) for no images)."""
    model.eval()
    out = [torch.softmax(model(uint8_to_classifier(on_model(model, images[s:s + batch_size]), mean, std)).double(), 1).cpu()
           for s in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def target_probability(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std, batch_size: int = 1024) -> torch.Tensor:
    """(N,) float64 softmax probability of targets[i] for each uint8 image."""
    return probabilities(model, images, mean, std, batch_size).gather(1, targets.cpu().view(-1, 1)).squeeze(1)


def vce_success(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std, threshold: float = 0.9) -> torch.Tensor:
    """(N,) bool: the model gives the target class p ≥ threshold (the VCE literature's 0.9)."""
    return target_probability(model, images, targets, mean, std) >= threshold


def distance(images: torch.Tensor, starts: torch.Tensor, mean, std, norm: str = "l2") -> torch.Tensor:
    """(N,) L1 or L2 distance of each uint8 image to its start, in normalised pixel units."""
    return _distance(uint8_to_classifier(images, mean, std), uint8_to_classifier(starts, mean, std), norm)


@torch.no_grad()
def transfer(success_a: torch.Tensor, model_b: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std) -> dict:
    """Of the images that succeeded against model A, how many model B also predicts as the target.

    Returns {"succeeded_a", "transferred", "rate"}; rate = transferred / succeeded_a (nan if none succeeded).
    """
    ok = success_a.bool().cpu()
    n = int(ok.sum())
    if n == 0:
        return {"succeeded_a": 0, "transferred": 0, "rate": float("nan")}
    model_b.eval()
    pred = model_b(uint8_to_classifier(on_model(model_b, images[ok]), mean, std)).argmax(1).cpu()
    hit = int((pred == targets.cpu()[ok]).sum())
    return {"succeeded_a": n, "transferred": hit, "rate": hit / n}


# --- the pixel-space baseline ------------------------------------------------------------------

@dataclass(frozen=True)
class PGDConfig:
    """Targeted PGD. eps: the ball's radius in [0, 1] pixel units (L2 over all pixels and channels, or
    L∞); alpha: step size, None for 2.5·eps/steps (Madry et al.'s rule); random_start: start at a
    uniform point of the L∞ ball (torchattacks' PGD default) instead of the image."""

    norm: str = "l2"
    eps: float = 1.0
    steps: int = 20
    alpha: float | None = None
    random_start: bool = False

    def __post_init__(self):
        if self.norm not in PGD_NORMS:
            raise ValueError(f"PGDConfig.norm must be one of {', '.join(PGD_NORMS)}, got {self.norm!r}")
        if self.eps <= 0 or self.steps < 1 or (self.alpha is not None and self.alpha <= 0):
            raise ValueError(f"PGDConfig needs eps > 0, steps >= 1 and alpha > 0 or None, got {self.eps}, {self.steps}, {self.alpha}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps


def pgd_float(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std, config: PGDConfig,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Targeted PGD towards targets; returns float images in [0, 1], (N, C, H, W)."""
    model.eval()
    x = images.float() / 255.0  # the attack's units: [0, 1] pixels
    m, s = channel_stats(mean, std, x)
    targets = targets.to(x.device)
    adv = x.clone()
    if config.random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        adv = (adv + config.eps * noise).clamp(0, 1)
    alpha = config.step_size
    for _ in range(config.steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model((adv - m) / s), targets)  # mean over the batch: a per-image scale, which sign and L2 step ignore
        (g,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            if config.norm == "linf":
                adv = adv - alpha * g.sign()
                adv = (x + (adv - x).clamp(-config.eps, config.eps)).clamp(0, 1)
            else:
                g = g / (g.flatten(1).norm(dim=1) + 1e-10).view(-1, 1, 1, 1)
                delta = adv - alpha * g - x
                factor = (config.eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0)  # project onto the L2 ball
                adv = (x + delta * factor.view(-1, 1, 1, 1)).clamp(0, 1)
    return adv.detach()


def pgd_counterfactual(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std, config: PGDConfig,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Targeted PGD counterfactuals of uint8 images, as uint8 (N, C, H, W) (rounded, as VCEs are)."""
    return (pgd_float(model, images, targets, mean, std, config, generator) * 255).round().to(torch.uint8)


def pgd_at_success_rate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean, std, rate: float,
                        radii: list[float], norm: str = "l2", steps: int = 20, threshold: float = 0.9) -> dict:
    """PGD at the smallest radius of `radii` (ascending) whose success rate reaches `rate` (the VCEs').

    Returns {"eps", "images" (uint8), "success" (N,) bool, "rate"}; the largest radius if none reaches it.
    """
    out = {}
    for eps in radii:
        adv = pgd_counterfactual(model, images, targets, mean, std, PGDConfig(norm=norm, eps=eps, steps=steps))
        ok = vce_success(model, adv, targets, mean, std, threshold)
        out = {"eps": eps, "images": adv, "success": ok, "rate": float(ok.float().mean())}
        if out["rate"] >= rate:
            break
    return out


# --- distribution measures ---------------------------------------------------------------------

@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 1024) -> torch.Tensor:
    """(N, D) float64 input of the model's last nn.Linear (DigitsCNN: its 256 pooled conv features)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear: its penultimate features cannot be found")
    feats: list[torch.Tensor] = []
    hook = linears[-1].register_forward_hook(lambda mod, inp, out: feats.append(inp[0].flatten(1).double().cpu()))
    try:
        model.eval()
        for s in range(0, images.shape[0], batch_size):
            model(uint8_to_classifier(on_model(model, images[s:s + batch_size]), mean, std))
    finally:
        hook.remove()
    return torch.cat(feats)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (eigenvalues < 0 from
    rounding set to 0)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (N, D) and (M, D), as FID computes it:

        ‖μa - μb‖² + tr Σa + tr Σb - 2 tr (Σa^½ Σb Σa^½)^½

    The last trace equals FID's tr (Σa Σb)^½ (same eigenvalues) and is computed in float64 from
    the eigenvalues of a symmetric PSD matrix, so no complex parts arise as with scipy's sqrtm.
    Σ is the unbiased covariance; equal covariances leave exactly ‖μa - μb‖².
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def discriminator_accuracy(real: torch.Tensor, fake: torch.Tensor, mean, std, epochs: int = 20, seed: int = 0) -> float:
    """Test accuracy of a tiny CNN (digits_cnn, 2 classes) trained to tell real from fake uint8 images.

    n = min(len(real), len(fake)) of each, shuffled with seed; trained on the first half of each
    (the project's SGD recipe, `epochs` epochs), tested on the second half. 0.5 = indistinguishable.
    """
    from overinterp.training import TrainConfig, evaluate, train_model

    n = min(real.shape[0], fake.shape[0])
    if n < 4:
        raise ValueError(f"discriminator_accuracy needs at least 4 images of each kind, got {real.shape[0]} and {fake.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    real, fake = real[torch.randperm(real.shape[0], generator=g)[:n]], fake[torch.randperm(fake.shape[0], generator=g)[:n]]
    h = n // 2
    x_train, x_test = torch.cat([real[:h], fake[:h]]), torch.cat([real[h:], fake[h:]])
    y_train = torch.cat([torch.ones(h), torch.zeros(h)]).long()
    y_test = torch.cat([torch.ones(n - h), torch.zeros(n - h)]).long()
    torch.manual_seed(seed)
    model = create_model("digits_cnn", num_classes=2, in_channels=real.shape[1])
    train_model(model, x_train, y_train, mean, std, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed))
    return evaluate(model, x_test, y_test, mean, std)
