"""overinterp/report/figures.py: what each figure draws, read back from the matplotlib Figure and
compared with the input it was given (bar heights, error bars, medians, histogram counts, pixels)."""

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.image import imread
from matplotlib.patches import StepPatch

from overinterp.report import (
    DPI, accuracy_bars, accuracy_figure, confidence_figure, gallery_figure, median_iqr, save_figure, sis_size_figure,
    sis_size_percent,
)
from overinterp.selection import NO_SIS

SUMMARY = {
    "fraction": 0.05, "num_classes": 10,
    "accuracy": {
        "cnn": {"random-subset": [0.5, 0.7], "full": [0.9, 1.0], "bs-subset": [0.8, 0.8]},
        "mlp": {"full": [0.6], "bs-subset": [0.4, 0.5]},  # one seed of full; no random subsets
    },
}
S = 100 * np.sqrt(0.005)  # sample std (ddof=1) of two accuracies 0.1 apart, in percent: 0.1 / sqrt(2)


def bars_of(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def error_halves(ax) -> list[dict[float, float]]:
    """Per error-bar series: {bar x: half the bar's length}, i.e. the std drawn."""
    out = []
    for e in (c for c in ax.containers if isinstance(c, ErrorbarContainer)):
        segs = e.lines[2][0].get_segments()  # one (2, 2) segment per bar: [(x, y - err), (x, y + err)]
        out.append({round(s[0][0], 6): round((s[1][1] - s[0][1]) / 2, 6) for s in segs})
    return out


def test_accuracy_bars_are_mean_and_std_over_seeds():
    b = accuracy_bars(SUMMARY)
    assert b["models"] == ["cnn", "mlp"]
    assert b["conditions"] == ["full", "bs-subset", "random-subset"]  # condition_order, not insertion order
    np.testing.assert_allclose(b["mean"], [[95.0, 80.0, 60.0], [60.0, 45.0, np.nan]])
    np.testing.assert_allclose(b["std"], [[S, 0.0, 2 * S], [np.nan, S, np.nan]])


def test_accuracy_figure_draws_one_bar_series_per_condition_with_the_summary_numbers():
    ax = accuracy_figure(SUMMARY).axes[0]
    bars = bars_of(ax)
    assert [c.get_label() for c in bars] == ["full images", "BS 5% subsets", "random 5% subsets"]
    # per condition, its models' mean accuracy over seeds; mlp has no random bar
    assert [[round(r.get_height(), 6) for r in c] for c in bars] == [[95.0, 60.0], [80.0, 45.0], [60.0]]
    # each bar stands in its model's group: x near 0 for cnn, near 1 for mlp
    assert [[round(r.get_x() + r.get_width() / 2) for r in c] for c in bars] == [[0, 1], [0, 1], [0]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cnn", "mlp"]
    # error bars: the std over seeds, on the bar they belong to; none for mlp's single full seed
    centres = [[round(r.get_x() + r.get_width() / 2, 6) for r in c] for c in bars]
    halves = error_halves(ax)
    assert halves == [{centres[0][0]: round(S, 6)}, {centres[1][0]: 0.0, centres[1][1]: round(S, 6)},
                      {centres[2][0]: round(2 * S, 6)}]
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == 10.0
    assert ax.get_ylim() == (0.0, 100.0) and ax.get_ylabel() == "test accuracy (%)"
    assert ax.get_title() == "Test accuracy by training condition (mean ± std over 2 seeds)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(["full images", "BS 5% subsets", "random 5% subsets", "chance (10%)"])  # matplotlib lists lines first


def test_accuracy_figure_without_num_classes_has_no_chance_line():
    summary = {k: v for k, v in SUMMARY.items() if k != "num_classes"}
    ax = accuracy_figure(summary).axes[0]
    assert not [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(bars_of(ax)) == 3  # the bars stay


def test_accuracy_figure_of_one_seed_has_no_error_bars():
    ax = accuracy_figure({"fraction": 0.1, "accuracy": {"cnn": {"full": [0.9], "bs-subset": [0.3]}}}).axes[0]
    assert [[round(r.get_height(), 6) for r in c] for c in bars_of(ax)] == [[90.0], [30.0]]
    assert error_halves(ax) == []
    assert ax.get_title().endswith("over 1 seed)")


P = np.array([[1.0, 0.9, 0.0], [0.9, 0.1, 0.1], [0.8, 0.2, 0.2], [0.2, 0.0, 0.3], [0.1, 0.3, 0.9]])  # (5 images, 3 steps)
# by hand, per column of P sorted: median = 3rd of 5, quartiles (linear interpolation) = 2nd and 4th;
# the columns are skewed, so their means (0.6, 0.3, 0.3) differ from the medians
P_MEDIAN, P_Q1, P_Q3 = [0.8, 0.2, 0.2], [0.2, 0.1, 0.1], [0.9, 0.3, 0.3]


def test_median_iqr_by_hand():
    frac, med, (q1, q3) = median_iqr(P)
    np.testing.assert_allclose(frac, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(med, P_MEDIAN)
    np.testing.assert_allclose(q1, P_Q1)
    np.testing.assert_allclose(q3, P_Q3)
    with pytest.raises(ValueError, match="T >= 2"):
        median_iqr(np.ones((3, 1)))


def test_confidence_figure_draws_each_curve_median_and_band():
    other = np.array([[1.0, 0.5, 0.3, 0.1], [0.9, 0.7, 0.1, 0.0]])  # 2 images, 4 steps: median = mean of the two
    ax = confidence_figure({"bs": P, "random": other}, title="digits").axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["bs (n=5)", "random (n=2)"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lines[0].get_ydata(), P_MEDIAN)
    np.testing.assert_allclose(lines[1].get_xdata(), [0.0, 1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.95, 0.6, 0.2, 0.05])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    ys = bands[0].get_paths()[0].vertices[:, 1]  # the band's outline runs along q1 and back along q3
    assert np.isclose(ys.min(), min(P_Q1)) and np.isclose(ys.max(), max(P_Q3))
    for q in P_Q1 + P_Q3:
        assert np.isclose(ys, q).any()
    assert ax.get_title() == "digits" and ax.get_xlabel() == "fraction of pixels removed"
    assert ax.get_ylabel() == "median p(c), interquartile band shaded" and ax.get_xlim() == (0.0, 1.0)


def test_sis_size_percent_drops_and_counts_images_without_sis():
    pct, n_none = sis_size_percent(np.array([1, NO_SIS, 4, NO_SIS, 2]), 8)
    np.testing.assert_allclose(pct, [12.5, 50.0, 25.0])
    assert n_none == 2
    with pytest.raises(ValueError, match="in pixels"):
        sis_size_percent(np.array([0.05]), 8)


def test_sis_size_figure_counts_are_the_sizes_given():
    # hw = 100 pixels, so a size in pixels is also its percent; the largest SIS (95) sets the shared
    # bins: 30 bins of 95/30 = 3.17% each -> 10 falls in bin 3, 50 in bin 15, 95 (the right edge) in bin 29
    plain = np.array([10, 50, 50, 95, NO_SIS])
    dropout = np.array([50, NO_SIS, NO_SIS])
    ax = sis_size_figure({"plain": plain, "input dropout": dropout}, 100, 0.9).axes[0]
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert len(steps) == 2
    counts = [np.asarray(s.get_data().values) for s in steps]
    edges = [np.asarray(s.get_data().edges) for s in steps]
    for e in edges:
        np.testing.assert_allclose(e, np.linspace(0, 95, 31))
    expected = np.zeros(30, int)
    expected[[3, 15, 29]] = [1, 2, 1]
    np.testing.assert_array_equal(counts[0], expected)
    expected = np.zeros(30, int)
    expected[15] = 1
    np.testing.assert_array_equal(counts[1], expected)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["plain: median 50.0%, n=4; no SIS at τ=0.9: 1", "input dropout: median 50.0%, n=1; no SIS at τ=0.9: 2"]
    assert ax.get_xlabel() == "SIS size (% of pixels)" and ax.get_ylabel() == "images"
    assert ax.get_title() == "Sufficient input subset sizes at τ=0.9"


def test_sis_size_figure_legend_median_is_the_lower_median():
    ax = sis_size_figure({"plain": np.array([1, 4, 2, 8]), "none": np.array([NO_SIS])}, 8, 0.5).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["plain: median 25.0%, n=4; no SIS at τ=0.5: 0", "none: n=0; no SIS at τ=0.5: 1"]
    assert [int(np.sum(s.get_data().values)) for s in ax.patches if isinstance(s, StepPatch)] == [4, 0]


def gallery_input(rgb: bool):
    """3 images of 4x5 pixels, each column different, so a swapped or dropped column shows."""
    rng = np.random.default_rng(0)
    shape = (3, 4, 5, 3 if rgb else 1)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    panels = {"BS 5%": rng.integers(0, 256, shape, dtype=np.uint8), "SIS τ=0.9": np.zeros(shape, np.uint8)}
    return images, panels


@pytest.mark.parametrize("rgb", [False, True])
def test_gallery_grid_titles_and_pixels_are_the_input(rgb):
    images, panels = gallery_input(rgb)
    fig = gallery_figure(images, panels, ["a → a (0.90)", "b → c (0.50)", "c → c (0.99)"])
    axes = fig.axes
    assert len(axes) == 9
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in axes} == {(3, 3)}  # rows = images, columns = 1 + panels
    grid = np.array(axes, dtype=object).reshape(3, 3)  # row-major, as subplots adds them
    assert [ax.get_title() for ax in grid[0]] == ["original", "BS 5%", "SIS τ=0.9"]
    assert all(ax.get_title() == "" for ax in grid[1:].ravel())
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["a → a (0.90)", "b → c (0.50)", "c → c (0.99)"]
    columns = [images, panels["BS 5%"], panels["SIS τ=0.9"]]
    for r in range(3):
        for c in range(3):
            (im,) = grid[r, c].get_images()
            want = columns[c][r] if rgb else columns[c][r][..., 0]
            np.testing.assert_array_equal(np.asarray(im.get_array()), want)
            assert im.get_clim() == (0, 255)  # not stretched per panel
            assert (im.get_cmap().name == "gray") is not rgb


def test_gallery_labels_empty_sis_panels():
    images, panels = gallery_input(rgb=False)
    fig = gallery_figure(images, panels, empty_labels={"SIS τ=0.9": [False, True, True]}, tau=0.9)
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]  # row-major: 3 rows x 3 columns
    assert texts == [[], [], [], [], [], ["no SIS at τ=0.9"], [], [], ["no SIS at τ=0.9"]]
    no_tau = gallery_figure(images, panels, empty_labels={"SIS τ=0.9": [True, False, False]})
    assert [t.get_text() for t in no_tau.axes[2].texts] == ["no SIS at τ"]
    with pytest.raises(ValueError, match="not panels"):
        gallery_figure(images, panels, empty_labels={"SIS": [True, True, True]})
    with pytest.raises(ValueError, match="one per image"):
        gallery_figure(images, panels, empty_labels={"SIS τ=0.9": [True]})


def test_save_figure_writes_each_figure_as_png(tmp_path):
    """save_figure writes each figure at DPI: a PNG of the figure's size in pixels, not a blank one."""
    images, panels = gallery_input(rgb=True)
    figures = {
        "acc.png": accuracy_figure(SUMMARY),
        "conf.png": confidence_figure({"bs": P}),
        "sis.png": sis_size_figure({"plain": np.array([1, 2, NO_SIS])}, 16, 0.9),
        "g.png": gallery_figure(images, panels),
    }
    written = {save_figure(fig, str(tmp_path / name)): fig for name, fig in figures.items()}
    assert sorted(written) == sorted(str(tmp_path / f) for f in ("acc.png", "conf.png", "sis.png", "g.png"))
    for path, fig in written.items():
        png = imread(path)  # (H, W, 4) floats in [0, 1]
        w, h = fig.get_size_inches() * DPI
        assert png.shape[:2] == (round(h), round(w))
        assert png[..., :3].std() > 0.05  # something is drawn on the white
