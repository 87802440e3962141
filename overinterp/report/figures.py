"""Every figure of a report: accuracy by training condition, confidence as pixels are removed, SIS
sizes, and the gallery of images beside their pixel-subsets.

Each figure is a pure function of plain Python / numpy data that returns a matplotlib Figure
(accuracy_figure, confidence_figure, sis_size_figure, gallery_figure), so tests and notebooks can
look at what is drawn; `save_figure` writes any of them as a PNG and returns the path.
Figures are built with matplotlib's object API (`Figure`, rendered by Agg on save), not pyplot: no
global figure registry to leak from, no backend to switch, safe in Ray workers. matplotlib is
imported when a figure is drawn, so importing overinterp.report stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from overinterp.report.stats import lower_median, seed_mean_std
from overinterp.report.tables import condition_order, condition_title
from overinterp.selection import NO_SIS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # a (w, h)-inch figure is saved as a (100 w, 100 h)-pixel PNG
SIS_BINS = 30  # histogram bins between 0 and the largest SIS, shared by the variants


def new_figure(figsize: tuple[float, float], layout: Optional[str] = "constrained") -> Figure:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    return Figure(figsize=figsize, layout=layout)


def save_figure(fig: Figure, path: str) -> str:
    """Write fig as a PNG at DPI; returns path."""
    fig.savefig(path, dpi=DPI)
    return path


def accuracy_bars(summary: dict) -> dict:
    """The numbers behind accuracy_figure, in percent.

    Returns:
        {"models": [M names], "conditions": [C names, condition_order],
         "mean": (M, C) mean over seeds (nan where the model lacks the condition),
         "std": (M, C) sample std over seeds as in the accuracy table (nan for fewer than two seeds)}
    """
    models = list(summary["accuracy"])
    conds = sorted({c for a in summary["accuracy"].values() for c in a}, key=condition_order)
    mean = np.full((len(models), len(conds)), np.nan)
    std = np.full((len(models), len(conds)), np.nan)
    for i, m in enumerate(models):
        for j, c in enumerate(conds):
            mean[i, j], std[i, j] = seed_mean_std(summary["accuracy"][m].get(c, []))
    return {"models": models, "conditions": conds, "mean": mean, "std": std}


def accuracy_figure(summary: dict) -> Figure:
    """Grouped bar chart of summary["accuracy"] ({model: {condition: [accuracy per seed]}}).

    One group per model, one bar per condition (condition_order, labelled with condition_title at
    summary["fraction"]); bar = mean, error bar = std over seeds (none for one seed); y in percent.
    A dashed chance line at 100 / summary["num_classes"] when that key is given.
    """
    bars = accuracy_bars(summary)
    models, conds, mean, std = bars["models"], bars["conditions"], bars["mean"], bars["std"]
    pct = f"{100 * summary['fraction']:g}"
    fig = new_figure((max(5.0, 0.5 * len(models) * len(conds) + 2.5), 4.0))
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


def median_iqr(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T,) removed fractions in [0, 1], and the (T,) median and (2, T) quartiles over the N images of (N, T) p(c)."""
    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"a confidence curve must be an (N, T) array with N >= 1 images and T >= 2 steps, got shape {p.shape}")
    frac = np.linspace(0.0, 1.0, p.shape[1])  # column t = fraction t / (T - 1) removed
    return frac, np.median(p, axis=0), np.percentile(p, [25, 75], axis=0)


def confidence_figure(curves: dict[str, np.ndarray], title: str = "Confidence as pixels are removed") -> Figure:
    """Median p(c) against the fraction of pixels removed, one line per label, interquartile band shaded.

    Args:
        curves: {label: (N, T) p(c) of N images at T evenly spaced removed fractions, column t =
            fraction t / (T - 1)}, e.g. {"digits_cnn BS": ..., "digits_cnn random": ...}. A backward
            selection curve fits as it is once the unmasked confidence is put in front:
            np.concatenate([confidence[:, None], curve], 1) is (N, HW + 1), p(c) after 0..HW removals.
        title: the axes title.
    """
    fig = new_figure((5.5, 4.0))
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
    """One step histogram per variant (plain, ensemble, input dropout, ...) of SIS sizes as % of pixels.

    Args:
        sizes: {variant label: (N,) SIS sizes in pixels, NO_SIS where the image has none at tau}.
        hw: pixels per image.
        tau: the SIS threshold the sizes were found at; named in the legend beside the count of
            images without a SIS, which the histogram leaves out.
    """
    pcts = {label: sis_size_percent(s, hw) for label, s in sizes.items()}
    top = max([p.max() for p, _ in pcts.values() if len(p)], default=100.0)
    edges = np.linspace(0.0, top, SIS_BINS + 1)  # shared bins, so the variants compare bar by bar
    fig = new_figure((5.5, 4.0))
    ax = fig.add_subplot()
    for k, (label, (p, n_none)) in enumerate(pcts.items()):
        counts, _ = np.histogram(p, bins=edges)
        med = f"median {lower_median(p):.1f}%, " if len(p) else ""  # the median the SIS table reports
        ax.stairs(counts, edges, linewidth=1.5, color=f"C{k}", label=f"{label}: {med}n={len(p)}; no SIS at τ={tau:g}: {n_none}")
    ax.set_xlabel("SIS size (% of pixels)")
    ax.set_ylabel("images")
    ax.set_title(f"Sufficient input subset sizes at τ={tau:g}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def gallery_figure(
    images: np.ndarray,
    panels: dict[str, np.ndarray],
    titles: Optional[list[str]] = None,
    empty_labels: Optional[dict[str, list[bool]]] = None,
    tau: Optional[float] = None,
    first_title: str = "original",
) -> Figure:
    """A grid: one row per image, the original beside each masked version.

    Args:
        images: (N, H, W, C) uint8 originals, C = 1 (shown grey) or 3; the first column, titled first_title.
        panels: {column title: (N, H, W, C) uint8}, one column each, left to right.
        titles: N row labels (e.g. "label → prediction (p)"), written beside the originals.
        empty_labels: {column title: N flags}, True where that panel is empty because the image has
            no SIS at tau; such panels say "no SIS at τ=<tau>" in their centre instead of a blank.
        tau: the SIS threshold named on the empty panels.
    """
    n, cols = len(images), 1 + len(panels)
    empty_labels = empty_labels or {}
    unknown = set(empty_labels) - set(panels)
    if unknown:
        raise ValueError(f"empty_labels names columns {sorted(unknown)} that are not panels; panels are {list(panels)}")
    for title, flags in empty_labels.items():
        if len(flags) != n:
            raise ValueError(f"empty_labels[{title!r}] has {len(flags)} flags for {n} images; give one per image")
    no_sis = "no SIS at τ" + (f"={tau:g}" if tau is not None else "")
    fig = new_figure((2.0 * cols, 2.0 * n), layout=None)
    axes = fig.subplots(n, cols, squeeze=False)
    columns = {first_title: images, **panels}
    for r in range(n):
        for c, (title, imgs) in enumerate(columns.items()):
            ax = axes[r, c]
            img = imgs[r]
            grey = img.shape[-1] == 1
            # vmin/vmax fixed: a dim subset stays dim instead of being stretched to full contrast
            ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=255, interpolation="nearest")
            if empty_labels.get(title, [False] * n)[r]:  # an all-masked panel would otherwise read as a bug
                ax.text(0.5, 0.5, no_sis, transform=ax.transAxes, ha="center", va="center", fontsize=8,
                        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0 and titles:
                ax.set_ylabel(titles[r], fontsize=7)
    fig.tight_layout()
    return fig
