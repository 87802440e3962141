"""The plan: every selector x source x split once, every trial with its store key and baseline."""

from overinterp.config import RunConfig
from overinterp.pipeline.plan import make_plan


def _plan(cfg):
    return make_plan(cfg, (1, 8, 8), {"train": 10, "test": 6}, 3)


def test_selectors_fills_and_exact_tail_become_plan_entries(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), selectors=("backselect", "ig", "captum:InputXGradient"),
                    pixels_per_step=16, exact_tail=0.1, fills=("mean", "road"), selector_options={"ig": {"n_steps": 8}}).resolved()
    plan = _plan(cfg)
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
    from overinterp.pipeline.preflight import record_settings

    record_settings(RunConfig(out_dir=str(tmp_path), selectors=("backselect",), fills=("mean",)).resolved())
    # adding a selector or a fill adds work under new store tags / trial names: finished work stays valid
    record_settings(RunConfig(out_dir=str(tmp_path), selectors=("backselect", "gradient"), fills=("mean", "road"), exact_tail=0.5).resolved())


def test_a_pretrained_model_is_explained_once_and_is_every_trial_s_baseline(tmp_path):
    cfg = RunConfig(train="t", val="v", pretrained="tv:resnet18", models=("tv:resnet18", "resnet20"), seeds=(0,),
                    selectors=("bgsis", "gradient"), pixels_per_step=16, fills=("mean",), out_dir=str(tmp_path)).resolved()
    plan = make_plan(cfg, (3, 16, 16), {"train": 10, "test": 6}, 3)
    assert plan.full_trials == ()
    assert {(j.source.tag, j.tag, j.split) for j in plan.selections} == {
        ("tv_resnet18", "bgsis-k16", "train"), ("tv_resnet18", "bgsis-k16", "test"),
        ("tv_resnet18", "gradient", "train"), ("tv_resnet18", "gradient", "test")}  # once, not once per trained model
    assert {t.subset for t in plan.subset_trials} == {"tv_resnet18/bgsis-k16", "tv_resnet18/gradient", "none/random-seed0"}
    assert {t.model for t in plan.subset_trials} == {"tv:resnet18", "resnet20"}
    assert all(plan.baseline_of(t) is None for t in plan.subset_trials)  # the pretrained model is the baseline
