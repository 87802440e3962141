"""Results as people read them: the paper's Table 1 shape, SIS sizes, and a picture gallery."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from overinterp.selection import NO_SIS, sis_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def condition_title(condition: str, pct: str) -> str:
    """'bs-subset' -> 'BS 5% subsets', 'bs-positions-only' -> 'BS 5% positions only', ..."""
    if condition == "full":
        return "full images"
    if condition == "full+dropout":
        return "full images, input dropout"
    sel, _, what = condition.partition("-")
    sel = {"bs": "BS"}.get(sel, sel)
    fill = ""
    if "+" in what:
        what, fill = what.split("+", 1)
        fill = f", {fill.upper() if fill == 'road' else fill} fill"
    return f"{sel} {pct}% " + ("positions only" if what == "positions-only" else "subsets") + fill


def condition_order(condition: str) -> tuple:
    """full first, then model-selected subsets, then random, then positions-only controls."""
    return (condition != "full", condition.startswith("full+"), "positions" in condition, condition.startswith("random"), condition)


def mean_std(values: list[float]) -> str:
    """'97.5 ± 0.3' in percent (std over seeds; '± n/a' for one seed)."""
    if not values:
        return "–"
    m = 100 * statistics.fmean(values)
    s = f"{100 * statistics.stdev(values):.1f}" if len(values) > 1 else "n/a"
    return f"{m:.1f} ± {s}"


def sis_stats(curve: torch.Tensor, confidence: torch.Tensor, tau: float) -> dict:
    """Median SIS size at tau over the images that have one, in pixels and as a fraction of HW."""
    sizes = sis_size(curve, confidence, tau)
    have = sizes[sizes != NO_SIS].double()
    hw = curve.shape[1]
    med = float(have.median()) if len(have) else float("nan")  # lower median for even counts
    return {
        "tau": tau,
        "n_images": int(len(sizes)),
        "n_with_sis": int(len(have)),
        "median_size": med,
        "median_fraction": med / hw if len(have) else float("nan"),
    }


def accuracy_table(summary: dict) -> str:
    """Markdown table: rows model; columns one per condition (full, subsets, random, positions only),
    test accuracy mean ± std over seeds. Input-dropout models are reported in the SIS table."""
    pct = f"{100 * summary['fraction']:g}"
    conds = sorted({c for a in summary["accuracy"].values() for c in a if c != "full+dropout"}, key=condition_order)
    primary = [r["condition"] for comp in summary.get("comparison", {}).values() for r in comp["selectors"] if r["selector"] == summary["selector"]]
    if primary:  # several selectors: this table shows the primary one; the comparison table has them all
        conds = [c for c in conds if c == "full" or c.startswith((primary[0] + "-", "random-"))]
    head = "| model | " + " | ".join(condition_title(c, pct) for c in conds) + " |"
    lines = [head, "|" + "---|" * (len(conds) + 1)]
    for model, accs in summary["accuracy"].items():
        lines.append(f"| {model} | " + " | ".join(mean_std(accs.get(c, [])) for c in conds) + " |")
    n_seeds = max(len(v) for a in summary["accuracy"].values() for v in a.values())
    lines.append(f"\nTest accuracy (%), mean ± std over {n_seeds} seeds; {summary['n_keep']} of {summary['hw']} pixels kept."
                 + (" 'Positions only': trained and tested on the subset's mask, no pixel values — how much the"
                    " layout of a subset alone reveals the label." if any("positions" in c for c in conds) else ""))
    return "\n".join(lines)


def sis_table(summary: dict) -> str:
    """Markdown table of the overinterpretation mitigations: accuracy and median SIS size."""
    lines = [
        f"| model | variant | test accuracy (%) | median SIS size at τ={summary['tau']:g} (% of pixels) | images with a SIS |",
        "|---|---|---|---|---|",
    ]
    for model, variants in summary["sis"].items():
        for variant, s in variants.items():
            size = "–" if s["n_with_sis"] == 0 else f"{s['median_size']:.0f} ({100 * s['median_fraction']:.1f}%)"
            acc = summary["variant_accuracy"][model].get(variant)
            acc_s = "–" if acc is None else f"{100 * acc:.1f}"
            lines.append(f"| {model} | {s['label']} | {acc_s} | {size} | {s['n_with_sis']} / {s['n_images']} |")
    return "\n".join(lines)


def comparison_table(summary: dict, model: str) -> str:
    """Markdown: one row per selector and the random floor, as `compare_selectors` summarises them."""
    comp = summary["comparison"][model]
    pct = f"{100 * summary['fraction']:g}%"
    fills = summary.get("fills", ["mean"])
    head = (["selector"] + [f"trained on {pct} subsets, {f.upper() if f == 'road' else f} fill (%)" for f in fills]
            + ["positions only (%)", f"full model on the {pct} subsets (%)", "median p(c) on them",
               f"median SIS at τ={summary['tau']:g} (px, % of pixels)", "median p(c), SIS dilated 3×3"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(row: dict) -> list[str]:
        return [mean_std(row["accuracy"].get(f, [])) for f in fills] + [
            mean_std(row["positions"]) if row.get("positions") else "–",
            f"{100 * row['full_model_accuracy']:.1f}", f"{row['median_confidence']:.3f}"]

    for row in comp["selectors"]:
        size = ("–" if not row["images_with_sis"] else f"{row['median_sis_size']:.0f} ({100 * row['median_sis_fraction']:.1f}%)")
        dil = row["dilated_median_confidence"]
        lines.append(f"| {row['selector']} | " + " | ".join(cells(row) + [size, "–" if dil != dil else f"{dil:.3f}"]) + " |")
    lines.append(f"| random (floor) | " + " | ".join(cells(comp["random"]) + ["–", "–"]) + " |")
    lines.append(f"\nModels trained and tested on each selector's {pct} subsets of {model}-{comp['model_tag'].rsplit('-', 1)[-1]}'s "
                 "test/train images (mean ± std over seeds). Positions only: the mask alone, no pixel values — where it nearly "
                 "matches the filled subsets, the subset's layout, not its pixel values, carries the label. ROAD fill imputes "
                 "removed pixels from their neighbours so the mask's outline leaks less. Dilation: p(c) after restoring each "
                 "SIS pixel's 3×3 neighbourhood; a drop below τ means the SIS works like an adversarial pattern.")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    if summary.get("baseline"):  # a pretrained explained model (jobs/sis_imagenet.py)
        return pretrained_markdown(summary) + plots_markdown(summary.get("plots"))
    parts = [
        f"# Overinterpretation on {summary['dataset']}",
        "## Accuracy of models trained and tested on pixel-subsets (the paper's Table 1 shape)",
        accuracy_table(summary),
        "## Sufficient input subsets of the full-image models",
        sis_table(summary),
    ]
    for model in summary.get("comparison", {}):
        parts += [f"## Which pixels carry the signal: selectors compared on {model}", comparison_table(summary, model)]
    if summary.get("masked_confidence"):
        rows = [f"| model | median p(c) on its own {summary['selector']} subsets (test) | accuracy of the full-image model on them (%) |", "|---|---|---|"]
        for model, m in summary["masked_confidence"].items():
            rows.append(f"| {model} | {m['median_confidence']:.3f} | {100 * m['accuracy']:.1f} |")
        parts.append(f"## Confidence with {100 * (1 - summary['fraction']):g}% of pixels masked")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n" + plots_markdown(summary.get("plots"))


def plot_caption(file: str) -> str:
    """'sis_sizes.png' -> 'SIS sizes', 'accuracy_by_condition.png' -> 'Accuracy by condition'."""
    stem = file.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    words = stem.replace("_", " ").replace("-", " ").split()
    words = [w.upper() if w.lower() in ("sis", "bs", "road") else w for w in words]
    return " ".join(words)[:1].upper() + " ".join(words)[1:]


def plots_markdown(plots: Optional[list[str]]) -> str:
    """A '## Plots' section embedding each PNG (file names relative to summary.md); '' for none."""
    if not plots:
        return ""
    lines = ["", "## Plots", ""]
    for file in plots:
        lines += [f"![{plot_caption(file)}]({file})", ""]
    return "\n".join(lines)


def pretrained_markdown(summary: dict) -> str:
    pct = f"{100 * summary['fraction']:g}%"
    b = summary["baseline"]
    lines = [
        f"# Overinterpretation on {summary['dataset']} ({summary['images']['train']} train / {summary['images']['test']} validation images)",
        "",
        f"Pretrained {summary['model']} ({summary['weights']}): top-1 {100 * b['full']:.1f}% on full validation images, "
        f"{100 * b['own_subsets']:.1f}% on its own {summary['selector']} {pct} subsets.",
        "",
        f"## {summary['train_model']} trained from scratch on {pct} pixel-subsets",
        "",
        accuracy_table(summary),
    ]
    return "\n".join(lines) + "\n"


def gallery_figure(
    images: np.ndarray,
    panels: dict[str, np.ndarray],
    titles: Optional[list[str]] = None,
    empty_labels: Optional[dict[str, list[bool]]] = None,
    tau: Optional[float] = None,
) -> Figure:
    """The matplotlib Figure save_gallery writes; see there."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    n, cols = len(images), 1 + len(panels)
    empty_labels = empty_labels or {}
    unknown = set(empty_labels) - set(panels)
    if unknown:
        raise ValueError(f"empty_labels names columns {sorted(unknown)} that are not panels; panels are {list(panels)}")
    for title, flags in empty_labels.items():
        if len(flags) != n:
            raise ValueError(f"empty_labels[{title!r}] has {len(flags)} flags for {n} images; give one per image")
    no_sis = "no SIS at τ" + (f"={tau:g}" if tau is not None else "")
    fig = Figure(figsize=(2.0 * cols, 2.0 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    columns = {"original": images, **panels}
    for r in range(n):
        for c, (title, imgs) in enumerate(columns.items()):
            ax = axes[r, c]
            img = imgs[r]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
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


def save_gallery(
    path: str,
    images: np.ndarray,
    panels: dict[str, np.ndarray],
    titles: Optional[list[str]] = None,
    empty_labels: Optional[dict[str, list[bool]]] = None,
    tau: Optional[float] = None,
) -> None:
    """A PNG grid: one row per image, the original beside each masked version.

    images: (N, H, W, C) uint8 originals; panels: {column title: (N, H, W, C) uint8}.
    empty_labels: {column title: N flags}, True where that panel is empty because the image has no
        SIS at tau; such panels say "no SIS at τ=<tau>" in their centre instead of showing a blank.
    """
    gallery_figure(images, panels, titles, empty_labels, tau).savefig(path, dpi=100)
