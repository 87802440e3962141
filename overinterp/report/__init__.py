"""A run's results as people read and look at them: one place for every table and figure.

    stats.py    the numbers both show: accuracy over seeds, the lower median, SIS sizes (sis_stats)
    tables.py   markdown: the accuracy table (the paper's Table 1 shape), SIS and selector tables,
                summary_markdown (summary.md) and the '## Plots' section that embeds the figures
    figures.py  each figure a pure function returning a matplotlib Figure (accuracy, confidence vs
                pixels removed, SIS-size histograms, the gallery), each with a helper that saves it as PNG

Imports go one way: figures -> tables -> stats. Everything public is importable from here
(`from overinterp.report import summary_markdown, save_gallery, sis_stats`); importing it does not
import matplotlib, which figures.py loads when a figure is drawn.
"""

from overinterp.report.figures import (
    DPI, accuracy_bars, accuracy_figure, confidence_figure, gallery_figure, median_iqr, plot_accuracy_by_condition,
    plot_confidence_vs_removed, plot_sis_size_histograms, save_figure, save_gallery, sis_size_figure, sis_size_percent,
)
from overinterp.report.stats import lower_median, seed_mean_std, sis_stats
from overinterp.report.tables import (
    accuracy_table, comparison_table, condition_order, condition_title, mean_std, plot_caption, plots_markdown,
    pretrained_markdown, sis_table, summary_markdown,
)

__all__ = [
    "seed_mean_std", "lower_median", "sis_stats",
    "condition_title", "condition_order", "mean_std", "accuracy_table", "sis_table", "comparison_table",
    "summary_markdown", "pretrained_markdown", "plot_caption", "plots_markdown",
    "DPI", "save_figure", "accuracy_bars", "accuracy_figure", "plot_accuracy_by_condition",
    "median_iqr", "confidence_figure", "plot_confidence_vs_removed",
    "sis_size_percent", "sis_size_figure", "plot_sis_size_histograms",
    "gallery_figure", "save_gallery",
]
