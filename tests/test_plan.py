"""The plan: every selector x source x split once, every trial with its store key and baseline."""

from types import SimpleNamespace

import numpy as np

from overinterp.config import RunConfig
from overinterp.pipeline.plan import plan_small


def _data(n_train=10, n_test=6):
    return SimpleNamespace(shape=(1, 8, 8), num_classes=3, labels={"train": np.zeros(n_train), "test": np.zeros(n_test)})


def test_selectors_fills_and_exact_tail_become_plan_entries(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), selectors=("backselect", "ig", "captum:InputXGradient"),
                    pixels_per_step=16, exact_tail=0.1, fills=("mean", "road"), selector_options={"ig": {"n_steps": 8}}).resolved()
    plan = plan_small(cfg, _data())
    jobs = {(j.source.variant, j.tag, j.split) for j in plan.selections}
    assert jobs == {
        ("plain", "backselect-k16-tail0.1", "train"), ("plain", "backselect-k16-tail0.1", "test"),
        ("ensemble", "backselect-k16-tail0.1", "test"), ("input-dropout", "backselect-k16-tail0.1", "test"),  # the primary only
        ("plain", "ig-n8", "train"), ("plain", "ig-n8", "test"),
        ("plain", "captum_InputXGradient", "train"), ("plain", "captum_InputXGradient", "test"),
    }
    assert plan.primary == "backselect-k16-tail0.1"
    assert plan.selection_for("digits_cnn-s0/ig-n8", "test").params == {"n_steps": 8, "method": "gausslegendre"}
    # per seed: 3 selectors x (2 fills + positions) + random x 2 fills
    assert len(plan.subset_trials) == 2 * (3 * 3 + 2) and len({t.name for t in plan.subset_trials}) == len(plan.subset_trials)
    conditions = {t.condition for t in plan.subset_trials}
    assert {"bs-subset", "bs-subset+road", "bs-positions-only", "ig-subset+road", "captum_InputXGradient-positions-only",
            "random-subset", "random-subset+road"} <= conditions
    for t in plan.subset_trials:
        assert plan.baseline_of(t).subset is None and plan.baseline_of(t).seed == t.seed


def test_selector_and_fill_changes_reuse_the_out_dir(tmp_path):
    from overinterp.config import check_reuse

    path = str(tmp_path / "config.json")
    check_reuse(RunConfig(out_dir=str(tmp_path), selectors=("backselect",), fills=("mean",)).resolved(), path)
    # adding a selector or a fill adds work under new store tags / trial names: finished work stays valid
    check_reuse(RunConfig(out_dir=str(tmp_path), selectors=("backselect", "gradient"), fills=("mean", "road"), exact_tail=0.5).resolved(), path)
