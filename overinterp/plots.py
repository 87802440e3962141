"""Figures a reviewer would rather look at than read: accuracy by training condition, confidence as
pixels are removed, and SIS sizes.

Pure plotting: inputs are plain Python / numpy data from a run's summary, and each plot_* function
writes one PNG and returns its path. Each has a *_figure twin that returns the matplotlib Figure, so
tests (and notebooks) can look at what is drawn. Figures are built with matplotlib's object API
(`Figure`, rendered by Agg on save), not pyplot: no global figure registry to leak from, no backend
to switch, safe in Ray workers.
"""

from __future__ import annotations

import statistics

import numpy as np
from matplotlib.figure import Figure

from overinterp.report import condition_order, condition_title
from overinterp.selection import NO_SIS

DPI = 100


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    return path


def accuracy_bars(summary: dict) -> dict:
    """The numbers behind plot_accuracy_by_condition, in percent.

    Returns:
        {"models": [M names], "conditions": [C names, condition_order],
         "mean": (M, C) mean over seeds (nan where the model lacks the condition),
         "std": (M, C) sample std over seeds as in report.mean_std (nan for fewer than two seeds)}
    """
    models = list(summary["accuracy"])
    conds = sorted({c for a in summary["accuracy"].values() for c in a}, key=condition_order)
    mean = np.full((len(models), len(conds)), np.nan)
    std = np.full((len(models), len(conds)), np.nan)
    for i, m in enumerate(models):
        for j, c in enumerate(conds):
            accs = summary["accuracy"][m].get(c, [])
            if accs:
                mean[i, j] = 100 * statistics.fmean(accs)
            if len(accs) > 1:
                std[i, j] = 100 * statistics.stdev(accs)  # the same ddof=1 std as the accuracy table
    return {"models": models, "conditions": conds, "mean": mean, "std": std}


def accuracy_figure(summary: dict) -> Figure:
    """Grouped bars: one group per model, one bar per condition; see plot_accuracy_by_condition."""
    bars = accuracy_bars(summary)
    models, conds, mean, std = bars["models"], bars["conditions"], bars["mean"], bars["std"]
    pct = f"{100 * summary['fraction']:g}"
    fig = Figure(figsize=(max(5.0, 0.5 * len(models) * len(conds) + 2.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(conds)
    x = np.arange(len(models), dtype=float)
    for j, c in enumerate(conds):
        xs = x + (j - (len(conds) - 1) / 2) * width
        have = ~np.isnan(mean[:, j])
        ax.bar(xs[have], mean[have, j], width, label=condition_title(c, pct), color=f"C{j}")
        spread = have & ~np.isnan(std[:, j])
        if spread.any():
            ax.errorbar(xs[spread], mean[spread, j], yerr=std[spread, j], fmt="none", ecolor="black", capsize=3, linewidth=1)
    if summary.get("num_classes"):
        chance = 100 / summary["num_classes"]
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.3g}%)")
    ax.set_xticks(x, models)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    n_seeds = max(len(v) for a in summary["accuracy"].values() for v in a.values())
    ax.set_title(f"Test accuracy by training condition (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_accuracy_by_condition(summary: dict, path: str) -> str:
    """Grouped bar chart of summary["accuracy"] ({model: {condition: [accuracy per seed]}}).

    One group per model, one bar per condition (condition_order, labelled with condition_title at
    summary["fraction"]); bar = mean, error bar = std over seeds (none for one seed); y in percent.
    A dashed chance line at 100 / summary["num_classes"] when that key is given.

    Returns:
        path, where the PNG was written.
    """
    return _save(accuracy_figure(summary), path)


def median_iqr(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T,) removed fractions in [0, 1], and the (T,) median and (2, T) quartiles over the N images of (N, T) p(c)."""
    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"a confidence curve must be an (N, T) array with N >= 1 images and T >= 2 steps, got shape {p.shape}")
    frac = np.linspace(0.0, 1.0, p.shape[1])  # column t = fraction t / (T - 1) removed
    return frac, np.median(p, axis=0), np.percentile(p, [25, 75], axis=0)


def confidence_figure(curves: dict[str, np.ndarray], title: str = "Confidence as pixels are removed") -> Figure:
    """Median p(c) with its interquartile band, one line per label; see plot_confidence_vs_removed."""
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for k, (label, p) in enumerate(curves.items()):
        frac, med, (q1, q3) = median_iqr(p)
        ax.fill_between(frac, q1, q3, color=f"C{k}", alpha=0.2, linewidth=0)
        ax.plot(frac, med, color=f"C{k}", label=f"{label} (n={len(p)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("median p(c), interquartile band shaded")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_confidence_vs_removed(curves: dict[str, np.ndarray], path: str, title: str = "Confidence as pixels are removed") -> str:
    """Median p(c) against the fraction of pixels removed, interquartile band shaded.

    Args:
        curves: {label: (N, T) p(c) of N images at T evenly spaced removed fractions, column t =
            fraction t / (T - 1)}, e.g. {"digits_cnn BS": ..., "digits_cnn random": ...}. A backward
            selection curve fits as it is once the unmasked confidence is put in front:
            np.concatenate([confidence[:, None], curve], 1) is (N, HW + 1), p(c) after 0..HW removals.
    Returns:
        path, where the PNG was written.
    """
    return _save(confidence_figure(curves, title), path)


def sis_size_percent(sizes: np.ndarray, hw: int) -> tuple[np.ndarray, int]:
    """SIS sizes as % of the hw pixels, images without a SIS (NO_SIS) dropped, and how many were dropped."""
    sizes = np.asarray(sizes).reshape(-1)
    none = sizes == NO_SIS
    bad = ~none & ((sizes < 1) | (sizes > hw))
    if bad.any():
        raise ValueError(f"SIS sizes must be pixel counts in [1, {hw}] or NO_SIS ({NO_SIS}); got {sizes[bad][:5].tolist()}"
                         " — pass sizes in pixels (selection.sis_size), not fractions")
    return 100.0 * sizes[~none] / hw, int(none.sum())


def sis_size_figure(sizes: dict[str, np.ndarray], hw: int, tau: float) -> Figure:
    """Overlaid SIS size histograms, one per variant; see plot_sis_size_histograms."""
    pcts = {label: sis_size_percent(s, hw) for label, s in sizes.items()}
    top = max([p.max() for p, _ in pcts.values() if len(p)], default=100.0)
    bins = np.linspace(0.0, top, 31)  # shared bins, so the variants compare bar by bar
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for k, (label, (p, n_none)) in enumerate(pcts.items()):
        med = f"median {np.sort(p)[(len(p) - 1) // 2]:.1f}%, " if len(p) else ""  # lower median, as report.sis_stats
        ax.hist(p, bins=bins, histtype="step", linewidth=1.5, color=f"C{k}",
                label=f"{label}: {med}n={len(p)}; no SIS at τ={tau:g}: {n_none}")
    ax.set_xlabel("SIS size (% of pixels)")
    ax.set_ylabel("images")
    ax.set_title(f"Sufficient input subset sizes at τ={tau:g}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_sis_size_histograms(sizes: dict[str, np.ndarray], hw: int, path: str, tau: float) -> str:
    """One histogram per variant (plain, ensemble, input dropout, ...) of SIS sizes as % of pixels.

    Args:
        sizes: {variant label: (N,) SIS sizes in pixels, NO_SIS where the image has none at tau}.
        hw: pixels per image.
        tau: the SIS threshold the sizes were found at; named in the legend beside the count of
            images without a SIS, which the histogram leaves out.
    Returns:
        path, where the PNG was written.
    """
    return _save(sis_size_figure(sizes, hw, tau), path)


__all__ = [
    "accuracy_bars", "accuracy_figure", "plot_accuracy_by_condition",
    "median_iqr", "confidence_figure", "plot_confidence_vs_removed",
    "sis_size_percent", "sis_size_figure", "plot_sis_size_histograms",
]
