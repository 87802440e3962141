"""A run's results as people read and look at them: one place for every table and figure.

    stats.py    the numbers both show: accuracy over seeds, the lower median, SIS sizes (sis_stats)
    tables.py   markdown: the accuracy table (the paper's Table 1 shape), SIS and selector tables,
                summary_markdown (summary.md) and the '## Plots' section that embeds the figures
    figures.py  each figure a pure function returning a matplotlib Figure (accuracy, confidence vs
                pixels removed, SIS-size histograms, the gallery); save_figure writes one as PNG

Imports go one way: figures -> tables -> stats. Everything public is importable from here
(`from overinterp.report import summary_markdown, save_figure, sis_stats`); importing it does not
import matplotlib, which figures.py loads when a figure is drawn.
"""

from overinterp.report.figures import (
    DPI, accuracy_bars, accuracy_figure, confidence_figure, gallery_figure, median_iqr, save_figure, sis_size_figure,
    sis_size_percent,
)
from overinterp.report.stats import lower_median, seed_mean_std, sis_stats
from overinterp.report.tables import (
    accuracy_table, comparison_table, condition_order, condition_title, explain_markdown, mean_std, plot_caption, plots_markdown,
    pretrained_markdown, sis_table, summary_markdown,
)

