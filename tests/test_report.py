import torch

from overinterp.report import accuracy_table, mean_std, sis_stats


def test_mean_std():
    assert mean_std([0.9, 1.0]) == "95.0 ± 7.1"
    assert mean_std([0.5]) == "50.0 ± n/a"
    assert mean_std([]) == "–"


def test_sis_stats_counts_images_without_sis():
    curve = torch.tensor([[0.1, 0.2, 0.995, 0.1], [0.1, 0.1, 0.1, 0.1]])
    s = sis_stats(curve, torch.tensor([0.999, 0.5]), 0.99)
    # image 0: k=1 -> curve[2] = 0.995 >= 0.99, size 1; image 1 has no SIS
    assert s["n_with_sis"] == 1 and s["median_size"] == 1 and s["median_fraction"] == 0.25


def test_accuracy_table_shape():
    summary = {"fraction": 0.05, "n_keep": 52, "hw": 1024,
               "accuracy": {"resnet20": {"random-subset": [0.5, 0.52], "bs-positions-only": [0.7, 0.7], "full": [0.9, 0.92],
                                         "bs-subset": [0.8, 0.82], "bs-subset+road": [0.6, 0.6], "full+dropout": [0.9, 0.9]}}}
    table = accuracy_table(summary)
    assert ("| model | full images | BS 5% subsets | BS 5% subsets, ROAD fill | random 5% subsets | BS 5% positions only |"
            in table)
    assert "| resnet20 | 91.0 ± 1.4 | 81.0 ± 1.4 | 60.0 ± 0.0 | 51.0 ± 1.4 | 70.0 ± 0.0 |" in table
    assert "52 of 1024 pixels" in table and "Positions only" in table
