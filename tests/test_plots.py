import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from overinterp.plots import (
    accuracy_bars, accuracy_figure, confidence_figure, median_iqr, plot_accuracy_by_condition,
    plot_confidence_vs_removed, plot_sis_size_histograms, sis_size_figure, sis_size_percent,
)
from overinterp.report import gallery_figure, save_gallery, summary_markdown
from overinterp.selection import NO_SIS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SUMMARY = {
    "fraction": 0.05, "num_classes": 10,
    "accuracy": {
        "cnn": {"random-subset": [0.5, 0.7], "full": [0.9, 1.0], "bs-subset": [0.8, 0.8]},
        "mlp": {"full": [0.6], "bs-subset": [0.4, 0.5]},  # one seed of full; no random subsets
    },
}


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1024


def test_plots_write_pngs(tmp_path):
    a = plot_accuracy_by_condition(SUMMARY, str(tmp_path / "acc.png"))
    curves = {"cnn BS": np.array([[1.0, 0.9, 0.2], [0.8, 0.7, 0.1]]), "cnn random": np.array([[1.0, 0.5, 0.1]])}
    c = plot_confidence_vs_removed(curves, str(tmp_path / "conf.png"), title="digits")
    h = plot_sis_size_histograms({"plain": np.array([1, 2, 2, NO_SIS]), "input dropout": np.array([4, 8])}, 16, str(tmp_path / "sis.png"), 0.9)
    assert (a, c, h) == tuple(str(tmp_path / f) for f in ("acc.png", "conf.png", "sis.png"))
    for p in (a, c, h):
        assert_png(p)


def test_accuracy_bars_are_mean_and_std_over_seeds():
    b = accuracy_bars(SUMMARY)
    assert b["models"] == ["cnn", "mlp"]
    assert b["conditions"] == ["full", "bs-subset", "random-subset"]  # condition_order, not insertion order
    np.testing.assert_allclose(b["mean"], [[95.0, 80.0, 60.0], [60.0, 45.0, np.nan]])
    s = 100 * np.sqrt(0.005)  # sample std of two values 0.1 apart: 0.1 / sqrt(2)
    np.testing.assert_allclose(b["std"], [[s, 0.0, 2 * s], [np.nan, s, np.nan]])


def test_accuracy_figure_draws_those_numbers():
    ax = accuracy_figure(SUMMARY).axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["full images", "BS 5% subsets", "random 5% subsets"]
    heights = [[round(r.get_height(), 6) for r in c] for c in bars]
    assert heights == [[95.0, 60.0], [80.0, 45.0], [60.0]]  # per condition, its models; mlp has no random bar
    errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    half = [[round((seg[1][1] - seg[0][1]) / 2, 6) for seg in e.lines[2][0].get_segments()] for e in errs]
    s = round(100 * np.sqrt(0.005), 6)
    assert half == [[s], [0.0, s], [2 * s]]  # full: cnn only (mlp has one seed, no error bar)
    chance = [l for l in ax.get_lines() if l.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == 10.0
    assert ax.get_ylim() == (0.0, 100.0)


def test_accuracy_figure_without_num_classes_has_no_chance_line():
    summary = {k: v for k, v in SUMMARY.items() if k != "num_classes"}
    assert not [l for l in accuracy_figure(summary).axes[0].get_lines() if l.get_label().startswith("chance")]


def test_median_iqr_and_confidence_lines():
    p = np.array([[1.0, 0.6, 0.0], [0.8, 0.4, 0.2], [0.6, 0.2, 0.4], [0.4, 0.0, 0.6], [0.2, 0.8, 0.8]])
    frac, med, (q1, q3) = median_iqr(p)
    np.testing.assert_allclose(frac, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(med, [0.6, 0.4, 0.4])
    np.testing.assert_allclose(q1, [0.4, 0.2, 0.2])
    np.testing.assert_allclose(q3, [0.8, 0.6, 0.6])
    line = confidence_figure({"bs": p}).axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), frac)
    np.testing.assert_allclose(line.get_ydata(), med)
    with pytest.raises(ValueError, match="T >= 2"):
        median_iqr(np.ones((3, 1)))


def test_sis_histograms_exclude_and_count_images_without_sis():
    pct, n_none = sis_size_percent(np.array([1, NO_SIS, 4, NO_SIS, 2]), 8)
    np.testing.assert_allclose(pct, [12.5, 50.0, 25.0])
    assert n_none == 2
    ax = sis_size_figure({"plain": np.array([1, NO_SIS, 4, NO_SIS, 2]), "ensemble": np.array([NO_SIS])}, 8, 0.9).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "no SIS at τ=0.9: 2" in legend[0] and "n=3" in legend[0] and "median 25.0%" in legend[0]
    assert "no SIS at τ=0.9: 1" in legend[1] and "n=0" in legend[1]
    with pytest.raises(ValueError, match="in pixels"):
        sis_size_percent(np.array([0.05]), 8)


def test_gallery_labels_empty_sis_panels(tmp_path):
    images = np.full((2, 4, 4, 1), 200, np.uint8)
    panels = {"BS 5%": images // 2, "SIS τ=0.9": np.zeros_like(images)}
    fig = gallery_figure(images, panels, ["a", "b"], empty_labels={"SIS τ=0.9": [False, True]}, tau=0.9)
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]  # row-major: 2 rows x 3 columns
    assert texts == [[], [], [], [], [], ["no SIS at τ=0.9"]]
    assert [t.get_text() for t in gallery_figure(images, panels, empty_labels={"SIS τ=0.9": [True, True]}).axes[2].texts] == ["no SIS at τ"]
    save_gallery(str(tmp_path / "g.png"), images, panels, ["a", "b"])  # the old call still works
    assert_png(tmp_path / "g.png")
    with pytest.raises(ValueError, match="not panels"):
        gallery_figure(images, panels, empty_labels={"SIS": [True, True]})


def test_summary_markdown_embeds_plots():
    summary = {
        "dataset": "digits", "fraction": 0.05, "n_keep": 4, "hw": 64, "tau": 0.9,
        "accuracy": {"cnn": {"full": [0.9]}}, "variant_accuracy": {"cnn": {}},
        "sis": {"cnn": {"plain": {"label": "plain", "n_with_sis": 1, "n_images": 2, "median_size": 3.0, "median_fraction": 3 / 64}}},
    }
    plain = summary_markdown(summary)
    assert "## Plots" not in plain and "![" not in plain
    md = summary_markdown({**summary, "plots": ["accuracy_by_condition.png", "sis_sizes.png"]})
    assert md.startswith(plain)  # everything else as it was, plots after the tables
    assert md[len(plain):] == "\n## Plots\n\n![Accuracy by condition](accuracy_by_condition.png)\n\n![SIS sizes](sis_sizes.png)\n"
