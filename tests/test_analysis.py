"""pipeline/analysis.py: the pure parts of the analysis (the summary's shape is tested through whole
runs in test_pipeline.py and test_jobs.py)."""

import numpy as np
import pytest

from overinterp.pipeline import analysis  # not its TestImages by name: pytest would take it for a test class
from overinterp.pipeline.analysis import pretrained_baseline


def _test_images(analysed: int, total: int) -> analysis.TestImages:
    return analysis.TestImages(image_id=np.arange(analysed), images=np.zeros((analysed, 3, 2, 2), np.uint8), labels=np.zeros(analysed, np.int64),
                      mean=(0.5,) * 3, std=(0.25,) * 3, classes=("a", "b"), total=total)


def test_a_pretrained_baseline_comes_from_the_whole_split_and_never_from_a_part_of_it():
    measured = {"full": 71.0, "own_subsets": 40.0, "images": 50000}
    assert pretrained_baseline(measured, _test_images(3, 5), 90.0, 60.0) is measured  # a backend's pass over all 5
    assert pretrained_baseline(None, _test_images(5, 5), 90.0, 60.0) == {"full": 90.0, "own_subsets": 60.0, "images": 5}
    with pytest.raises(ValueError, match=r"needs the whole test split \(5 images\) or a backend's pass over it; the analysis has 3"):
        pretrained_baseline(None, _test_images(3, 5), 90.0, 60.0)  # 3 of 5 images would pass for the model's accuracy
