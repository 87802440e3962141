"""The three pixel spaces of this subpackage and the only conversions between them.

- uint8: what data sets hold and results return, 0..255, (B, C, H, W);
- diffusion: the diffusion model's units, [-1, 1] (uint8 / 127.5 - 1);
- classifier: the project's normalised units, (x / 255 - mean) / std per channel (data.normalize),
  where 0 is the data set's mean colour.
"""

from __future__ import annotations

import torch


def channel_stats(mean, std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return m, s


def uint8_to_diffusion(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def diffusion_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in diffusion units (B, C, H, W) -> uint8, clamped to [-1, 1] and rounded."""
    return ((x.detach().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def diffusion_to_classifier(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] -> normalised units, differentiably (guidance backpropagates through it)."""
    m, s = channel_stats(mean, std, x)
    return ((x + 1.0) / 2.0 - m) / s


def classifier_to_diffusion(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised units -> [-1, 1] (not clamped)."""
    m, s = channel_stats(mean, std, x)
    return (x * s + m) * 2.0 - 1.0


def uint8_to_classifier(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32; the same numbers as data.normalize."""
    m, s = channel_stats(mean, std, images.float())
    return (images.float() / 255.0 - m) / s
