"""overinterp/report/tables.py and stats.py: the markdown tables and the numbers they share with the figures."""

import math

import numpy as np
import pytest
import torch

from overinterp.report import (
    accuracy_bars, accuracy_table, condition_order, condition_title, lower_median, mean_std, plot_caption,
    seed_mean_std, sis_stats, sis_table, summary_markdown,
)


def test_seed_mean_std_in_percent_with_sample_std():
    m, s = seed_mean_std([0.9, 1.0])
    assert m == pytest.approx(95.0) and s == pytest.approx(100 * 0.1 / math.sqrt(2))  # ddof=1
    m, s = seed_mean_std([0.5])
    assert m == 50.0 and math.isnan(s)
    assert all(math.isnan(v) for v in seed_mean_std([]))


def test_mean_std():
    assert mean_std([0.9, 1.0]) == "95.0 ± 7.1"
    assert mean_std([0.5]) == "50.0 ± n/a"
    assert mean_std([]) == "–"


def test_table_and_bars_show_the_same_numbers():
    summary = {"fraction": 0.05, "n_keep": 4, "hw": 64,
               "accuracy": {"cnn": {"full": [0.91, 0.95, 0.9], "bs-subset": [0.3, 0.41]}}}
    bars = accuracy_bars(summary)
    cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(bars["mean"][0], bars["std"][0])]
    assert f"| cnn | {' | '.join(cells)} |" in accuracy_table(summary)


def test_lower_median():
    assert lower_median(np.array([4, 1, 3, 2])) == 2.0  # the lower of 2 and 3: an observed size
    assert lower_median(np.array([5, 1, 3])) == 3.0
    assert math.isnan(lower_median(np.array([])))


def test_sis_stats_counts_images_without_sis():
    curve = torch.tensor([[0.1, 0.2, 0.995, 0.1], [0.1, 0.1, 0.1, 0.1]])
    s = sis_stats(curve, torch.tensor([0.999, 0.5]), 0.99)
    # image 0: k=1 -> curve[2] = 0.995 >= 0.99, size 1; image 1 has no SIS
    assert s == {"tau": 0.99, "n_images": 2, "n_with_sis": 1, "median_size": 1.0, "median_fraction": 0.25}


def test_sis_stats_median_is_the_lower_one_and_nan_without_any_sis():
    # p(c) after 1..4 removals; SIS size k: curve[HW - k - 1] >= tau (the last k pixels kept), k = HW: the unmasked image
    curve = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.95, 0.1], [0.1, 0.95, 0.1, 0.1], [0.95, 0.1, 0.1, 0.1]])
    s = sis_stats(curve, torch.tensor([0.95, 0.95, 0.95, 0.95]), 0.9)
    assert s["n_with_sis"] == 4 and s["median_size"] == 2.0 and s["median_fraction"] == 0.5  # sizes 4, 1, 2, 3
    none = sis_stats(torch.zeros(2, 4), torch.zeros(2), 0.9)
    assert none["n_with_sis"] == 0 and math.isnan(none["median_size"]) and math.isnan(none["median_fraction"])


def test_condition_titles_and_order():
    conds = ["random-subset", "bs-positions-only", "bs-subset+road", "full+dropout", "bs-subset", "full"]
    assert sorted(conds, key=condition_order) == ["full", "bs-subset", "bs-subset+road", "random-subset",
                                                  "bs-positions-only", "full+dropout"]
    assert [condition_title(c, "5") for c in ("full", "full+dropout", "bs-subset+road", "gradient-positions-only")] == [
        "full images", "full images, input dropout", "BS 5% subsets, ROAD fill", "gradient 5% positions only"]


def test_accuracy_table_shape():
    summary = {"fraction": 0.05, "n_keep": 52, "hw": 1024,
               "accuracy": {"resnet20": {"random-subset": [0.5, 0.52], "bs-positions-only": [0.7, 0.7], "full": [0.9, 0.92],
                                         "bs-subset": [0.8, 0.82], "bs-subset+road": [0.6, 0.6], "full+dropout": [0.9, 0.9]}}}
    table = accuracy_table(summary)
    assert ("| model | full images | BS 5% subsets | BS 5% subsets, ROAD fill | random 5% subsets | BS 5% positions only |"
            in table)
    assert "| resnet20 | 91.0 ± 1.4 | 81.0 ± 1.4 | 60.0 ± 0.0 | 51.0 ± 1.4 | 70.0 ± 0.0 |" in table
    assert "52 of 1024 pixels" in table and "Positions only" in table and "full images, input dropout" not in table


SUMMARY = {
    "dataset": "digits", "fraction": 0.05, "n_keep": 4, "hw": 64, "tau": 0.9,
    "accuracy": {"cnn": {"full": [0.9]}}, "variant_accuracy": {"cnn": {"plain": 0.9}},
    "sis": {"cnn": {"plain": {"label": "plain", "n_with_sis": 1, "n_images": 2, "median_size": 3.0, "median_fraction": 3 / 64},
                    "ensemble": {"label": "mean ensemble", "n_with_sis": 0, "n_images": 2, "median_size": math.nan,
                                 "median_fraction": math.nan}}},
}


def test_sis_table_rows():
    lines = sis_table(SUMMARY).splitlines()
    assert lines[2:] == ["| cnn | plain | 90.0 | 3 (4.7%) | 1 / 2 |", "| cnn | mean ensemble | – | – | 0 / 2 |"]
    dropout = {"label": "input dropout p=0.2 (seed 0)", "n_with_sis": 1, "n_images": 2, "median_size": 5.0, "median_fraction": 5 / 64}
    with_dropout = sis_table({**SUMMARY, "sis": {"cnn": {**SUMMARY["sis"]["cnn"], "input_dropout": dropout}}}).splitlines()
    assert with_dropout[4] == "| cnn | input dropout p=0.2 (seed 0) | – | 5 (7.8%) | 1 / 2 |"
    assert with_dropout[-1].startswith("Input dropout masks pixels in training only") and len(with_dropout) == len(lines) + 3


def test_summary_markdown_embeds_plots():
    plain = summary_markdown(SUMMARY)
    assert plain.startswith("# Overinterpretation on digits") and "## Plots" not in plain and "![" not in plain
    md = summary_markdown({**SUMMARY, "plots": ["accuracy_by_condition.png", "sis_sizes.png"]})
    assert md.startswith(plain)  # the tables unchanged, the plots after them
    assert md[len(plain):] == "\n## Plots\n\n![Accuracy by condition](accuracy_by_condition.png)\n\n![SIS sizes](sis_sizes.png)\n"


def test_summary_markdown_names_the_image_files_that_did_not_decode():
    first = [{"path": f"cat/{i}.jpg", "reason": "not an image PIL can read"} for i in range(4)]
    none = {"train": {"count": 0, "first": []}, "test": {"count": 0, "first": []}}
    assert summary_markdown({**SUMMARY, "skipped_images": none}) == summary_markdown(SUMMARY)  # nothing skipped: no section
    md = summary_markdown({**SUMMARY, "skipped_images": {**none, "train": {"count": 12, "first": first}}})
    assert md.split("## Image files that did not decode\n\n")[1].splitlines()[0] == (
        "Left out of every stage (`--strict` stops at the first instead): 12 in train (cat/0.jpg: not an image PIL can read, "
        "cat/1.jpg: not an image PIL can read, cat/2.jpg: not an image PIL can read, …). summary.json lists the first 10 of each split.")


def test_plot_caption():
    assert plot_caption("out/sis_sizes.png") == "SIS sizes"
    assert plot_caption("confidence_vs_removed.png") == "Confidence vs removed"


def test_sis_table_names_the_pretrained_model_where_one_is_explained():
    """The rows are keyed by the model trained on the subsets; the SIS are the pretrained model's."""
    sis = {"tv:resnet18": {"pretrained": {"label": "pretrained tv:resnet50 (DEFAULT)", "n_with_sis": 1, "n_images": 2,
                                          "median_size": 5.0, "median_fraction": 0.1}}}
    summary = {"tau": 0.99, "sis": sis, "variant_accuracy": {"tv:resnet18": {"pretrained": 0.5}}}
    assert "| tv:resnet18 | pretrained tv:resnet50 (DEFAULT) | 50.0 | 5 (10.0%) | 1 / 2 |" in sis_table(summary)
    assert "| tv:resnet50 | pretrained tv:resnet50 (DEFAULT) | 50.0 |" in sis_table({**summary, "baseline": {"full": 0.5}, "model": "tv:resnet50"})
