"""The numbers that tables and figures both show, computed in one place so they cannot disagree:
accuracy over seeds (mean and sample std, in percent), the lower median, and SIS sizes.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np
import torch

from overinterp.selection import NO_SIS, sis_size


def seed_mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of accuracies over seeds, both in percent.

    values: one accuracy in [0, 1] per seed. The mean is nan for no seeds, the std nan for fewer than two.
    """
    mean = 100 * statistics.fmean(values) if values else math.nan
    std = 100 * statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def lower_median(values: np.ndarray) -> float:
    """The lower of the two middle values for an even count (an observed size, as torch.median gives); nan for none."""
    values = np.sort(np.asarray(values, dtype=float).reshape(-1))
    return float(values[(len(values) - 1) // 2]) if len(values) else math.nan


def sis_stats(curve: torch.Tensor, confidence: torch.Tensor, tau: float) -> dict:
    """Median SIS size at tau over the images that have one, in pixels and as a fraction of HW.

    curve: (N, HW) p(c) after 1..HW removals; confidence: (N,) p(c) of the unmasked images.
    Returns:
        {"tau", "n_images", "n_with_sis", "median_size" (pixels, lower median; nan when no image
         has a SIS), "median_fraction" (median_size / HW)}
    """
    sizes = sis_size(curve, confidence, tau)
    have = sizes[sizes != NO_SIS].numpy()
    med = lower_median(have)
    return {
        "tau": tau,
        "n_images": int(len(sizes)),
        "n_with_sis": int(len(have)),
        "median_size": med,
        "median_fraction": med / curve.shape[1],
    }
