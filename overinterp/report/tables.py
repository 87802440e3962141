"""Results as people read them, in markdown: the paper's Table 1 shape (accuracy by training
condition), SIS sizes of the mitigations, the selector comparison, and the '## Plots' section that
embeds the figures (report/figures.py draws them).

Every function takes a run's summary dict (summary.json) or parts of it and returns text.
"""

from __future__ import annotations

import math
from typing import Optional

from overinterp.report.stats import seed_mean_std


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
    """full first, then model-selected subsets, then random, then positions-only controls, then input dropout."""
    return (condition != "full", condition.startswith("full+"), "positions" in condition, condition.startswith("random"), condition)


def mean_std(values: list[float]) -> str:
    """'97.5 ± 0.3' in percent (std over seeds; '± n/a' for one seed); '–' for none."""
    if not values:
        return "–"
    m, s = seed_mean_std(values)
    return f"{m:.1f} ± " + ("n/a" if math.isnan(s) else f"{s:.1f}")


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


def explained_name(summary: dict, model: str) -> str:
    """The model whose selections a table row describes: the pretrained one where a pretrained model is
    explained (the rows are keyed by the model trained on its subsets), else the row's own model."""
    return summary["model"] if summary.get("baseline") else model


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
            lines.append(f"| {explained_name(summary, model)} | {s['label']} | {acc_s} | {size} | {s['n_with_sis']} / {s['n_images']} |")
    if any("input_dropout" in variants for variants in summary["sis"].values()):
        lines.append("\nInput dropout masks pixels in training only: the model is tested and explained without it, as one "
                     "deterministic model (dropout kept at test time would make its predictions, and so its SIS, random).")
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
    lines.append("| random (floor) | " + " | ".join(cells(comp["random"]) + ["–", "–"]) + " |")
    whose = explained_name(summary, model) if summary.get("baseline") else f"{model}-{comp['model_tag'].rsplit('-', 1)[-1]}"
    lines.append(f"\nModels ({model}) trained and tested on each selector's {pct} subsets of {whose}'s "
                 "test/train images (mean ± std over seeds). Positions only: the mask alone, no pixel values — where it nearly "
                 "matches the filled subsets, the subset's layout, not its pixel values, carries the label. ROAD fill imputes "
                 "removed pixels from their neighbours so the mask's outline leaks less. Dilation: p(c) after restoring each "
                 "SIS pixel's 3×3 neighbourhood; a drop below τ means the SIS works like an adversarial pattern.")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """summary.md: every table of a run's summary, then its plots. Where a pretrained model is the
    explained one (the ImageNet preset), the head says so and gives its baseline accuracy."""
    if summary.get("baseline"):
        parts = [pretrained_markdown(summary).rstrip(), "## Sufficient input subsets of the pretrained model"]
    else:
        parts = [
            f"# Overinterpretation on {summary['dataset']}",
            "## Accuracy of models trained and tested on pixel-subsets (the paper's Table 1 shape)",
            accuracy_table(summary),
            "## Sufficient input subsets of the full-image models",
        ]
    parts.append(sis_table(summary))
    analysed = summary.get("analysed_test_images")
    if analysed and analysed[0] < analysed[1]:
        parts.append(f"SIS sizes, the selector table and the plots below are measured on the first {analysed[0]:,} of the "
                     f"{analysed[1]:,} test images (the trained models' accuracies on all of them).")
    for model in summary.get("comparison", {}):
        parts += [f"## Which pixels carry the signal: selectors compared on {explained_name(summary, model)}", comparison_table(summary, model)]
    if summary.get("masked_confidence"):
        rows = [f"| model | median p(c) on its own {summary['selector']} subsets (test) | accuracy of the full-image model on them (%) |", "|---|---|---|"]
        for model, m in summary["masked_confidence"].items():
            rows.append(f"| {explained_name(summary, model)} | {m['median_confidence']:.3f} | {100 * m['accuracy']:.1f} |")
        parts.append(f"## Confidence with {100 * (1 - summary['fraction']):g}% of pixels masked")
        parts.append("\n".join(rows))
    if summary.get("explain"):
        parts.append(explain_markdown(summary["explain"]))
    skipped = {s: v for s, v in (summary.get("skipped_images") or {}).items() if v["count"]}
    if skipped:  # {split: {"count", "first": [{"path", "reason"}]}}
        parts += ["## Image files that did not decode", "Left out of every stage (`--strict` stops at the first instead): "
                  + "; ".join(f"{v['count']:,} in {s} (" + ", ".join(f"{f['path']}: {f['reason']}" for f in v["first"][:3])
                              + (", …" if v["count"] > 3 else "") + ")" for s, v in skipped.items())
                  + ". summary.json lists the first 10 of each split."]
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
    """The head of summary.md for a pretrained explained model: its baseline, then the accuracy table."""
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


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.0f}%"


def explain_markdown(explain: dict) -> str:
    """The explain stage's section: VCE measures, the disagreement table, the galleries."""
    st = explain["settings"]
    prior = st["generator"] or f"a diffusion prior trained {st['prior_steps']:,} steps on the train split"
    lines = ["## What the models learned to look for: guided generation",
             f"Guidance `{st['method']}` ({st['guidance_steps']} DDIM steps) under {prior}; see BENCHMARKS.md for what the "
             "measures mean and how the methods compare.", ""]
    if explain.get("vce"):
        lines += ["Visual counterfactuals: each test image turned towards each other class, for each model; transfer: the "
                  "share of the successes its second-seed twin also calls the target.", "",
                  "| model | VCEs | success (p ≥ 0.9) | mean L2 of the successes (normalised units) | transfer |", "|---|---:|---:|---:|---|"]
        for label, v in explain["vce"].items():
            lines.append(f"| {label} | {v['n']} | {_pct(v['success_rate'])} | {v['mean_l2']:.2f} | "
                         + (f"{_pct(v['transfer'])} to {v['transfer_to']}" if v.get("transfer_to") else "– (one seed)") + " |")
        lines.append("")
    if explain.get("disagree"):
        lines += ["Where two models disagree most: images the first model of a direction calls class c and the second "
                  "does not (gap = p_first(c) − p_second(c); the real baseline is the mean gap of as many most-disagreeing real test images).", "",
                  "| pair | direction | gap, guided | gap, unguided | gap, real top | beyond the real max | success |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for pair, d in explain["disagree"].items():
            for direction, m in d["directions"].items():
                lines.append(f"| {pair} | {direction} | {m['mean_gap']:.2f} | {m['unguided_mean_gap']:.2f} | {m['real_top_gap']:.2f} | "
                             f"{_pct(m['share_beyond_real'])} | {_pct(m['success'])} |")
        lines.append("")
    for file in explain.get("galleries", []):
        lines += [f"![{plot_caption(file)}]({file})", ""]
    return "\n".join(lines).rstrip()
