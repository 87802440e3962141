"""The plan: every selector x source x split once, every trial with its store key and baseline."""

import os
from dataclasses import replace

import pytest

from overinterp.config import ConfigError, RunConfig
from overinterp.pipeline.plan import make_plan
from overinterp.pipeline.preflight import record_settings, refuse_other_settings


def _plan(cfg):
    return make_plan(cfg, (1, 8, 8), {"train": 10, "test": 6}, 3)


def _settings(cfg) -> str:
    return f"{cfg.out_dir}/config.json"


def _record(cfg):
    """What a run does under its --out lock: refuse other settings, record these where none are."""
    record_settings(cfg)


def _refuse(cfg) -> bool:
    return refuse_other_settings(cfg)


def test_selectors_fills_and_exact_tail_become_plan_entries(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), selectors=("backselect", "ig", "captum:InputXGradient"),
                    pixels_per_step=16, exact_tail=0.1, fills=("mean", "road"), selector_options={"ig": {"n_steps": 8}}).resolved()
    plan = _plan(cfg)
    jobs = {(j.source.variant, j.tag, j.split) for j in plan.selections}
    assert jobs == {
        ("plain", "backselect-k16-keep0.05-tail0.1", "train"), ("plain", "backselect-k16-keep0.05-tail0.1", "test"),
        ("ensemble", "backselect-k16-keep0.05-tail0.1", "test"), ("input-dropout", "backselect-k16-keep0.05-tail0.1", "test"),  # the primary only
        ("plain", "ig-n8", "train"), ("plain", "ig-n8", "test"),
        ("plain", "captum_InputXGradient", "train"), ("plain", "captum_InputXGradient", "test"),
    }
    assert plan.primary == "backselect-k16-keep0.05-tail0.1"
    ig_test = next(j for j in plan.selections if j.key == "digits_cnn-s0/ig-n8" and j.split == "test")
    assert ig_test.params == {"n_steps": 8, "method": "gausslegendre"}
    # per seed: 3 selectors x (2 fills + positions) + random x 2 fills
    assert len(plan.subset_trials) == 2 * (3 * 3 + 2) and len({t.name for t in plan.subset_trials}) == len(plan.subset_trials)
    conditions = {t.condition for t in plan.subset_trials}
    assert {"bs-subset", "bs-subset+road", "bs-positions-only", "ig-subset+road", "captum_InputXGradient-positions-only",
            "random-subset", "random-subset+road"} <= conditions
    for t in plan.subset_trials:
        assert plan.baseline_of(t).subset is None and plan.baseline_of(t).seed == t.seed


def _keys(plan) -> set:
    """Where the plan's finished work lives: selection store keys per split, and trial names with their inputs."""
    return ({("selection", j.key, j.split) for j in plan.selections}
            | {("trial", t.name, t.subset, t.fill) for t in plan.full_trials + plan.subset_trials})


def test_selector_and_fill_changes_reuse_the_out_dir(tmp_path):
    first = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), selectors=("backselect",), fills=("mean",)).resolved()
    _record(first)
    recorded = open(_settings(first)).read()
    more = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), selectors=("backselect", "gradient"), fills=("mean", "road"),
                     selector_options={"gradient": {}}).resolved()
    assert _refuse(more) is True  # config.json records these settings
    _record(more)
    assert open(_settings(more)).read() == recorded  # and keeps recording them
    # every key and trial name of the first run is in the second, unchanged: its finished work is found, not redone
    before, after = _plan(first), _plan(more)
    assert _keys(before) < _keys(after) and after.sources == before.sources and after.primary == before.primary
    added = _keys(after) - _keys(before)
    assert {k[1] for k in added if k[0] == "selection"} == {"digits_cnn-s0/gradient"}
    assert all(k[3] == "road" or "/gradient" in k[2] for k in added if k[0] == "trial")  # new work: the new selector, the new fill


def test_a_new_k_or_tail_is_stored_under_its_own_selector_tag(tmp_path):
    """pixels_per_step and exact_tail may change on a recorded out_dir because they name the store tag:
    the run selects again under the new tag instead of reading selections made with the old settings."""
    first = RunConfig(out_dir=str(tmp_path), selectors=("backselect",), pixels_per_step=16, exact_tail=0.1).resolved()
    _record(first)
    for change in ({"exact_tail": 0.5}, {"pixels_per_step": 8}):
        other = replace(first, **change)
        assert _refuse(other) is True
        old, new = {j.key for j in _plan(first).selections}, {j.key for j in _plan(other).selections}
        assert old.isdisjoint(new), change


@pytest.mark.parametrize("change", [{"seeds": (0, 1, 2)}, {"fraction": 0.1}, {"epochs": 3}, {"models": ("digits_mlp",)},
                                    {"input_dropout": 0.5}])
def test_other_settings_on_a_recorded_out_dir_are_refused(tmp_path, change):
    first = RunConfig(out_dir=str(tmp_path), seeds=(0, 1), epochs=2).resolved()
    _record(first)
    recorded = open(_settings(first)).read()
    (field,) = change
    assert field not in RunConfig.REUSABLE_CHANGES
    with pytest.raises(ConfigError, match=rf"other settings \({field}\)"):
        _refuse(replace(first, **change))
    with pytest.raises(ConfigError, match=field):
        _record(replace(first, **change))
    assert open(_settings(first)).read() == recorded  # the record of the finished work stays as it was


def test_a_pretrained_model_is_explained_once_and_is_every_trial_s_baseline(tmp_path):
    cfg = RunConfig(train="t", val="v", pretrained="tv:resnet18", models=("tv:resnet18", "resnet20"), seeds=(0,),
                    selectors=("bgsis", "gradient"), pixels_per_step=16, fills=("mean",), out_dir=str(tmp_path)).resolved()
    plan = make_plan(cfg, (3, 16, 16), {"train": 10, "test": 6}, 3)
    assert plan.full_trials == ()
    assert {(j.source.tag, j.tag, j.split) for j in plan.selections} == {
        ("tv_resnet18", "bgsis-k16-keep0.05", "train"), ("tv_resnet18", "bgsis-k16-keep0.05", "test"),
        ("tv_resnet18", "gradient", "train"), ("tv_resnet18", "gradient", "test")}  # once, not once per trained model
    assert {t.subset for t in plan.subset_trials} == {"tv_resnet18/bgsis-k16-keep0.05", "tv_resnet18/gradient", "none/random-seed0"}
    assert {t.model for t in plan.subset_trials} == {"tv:resnet18", "resnet20"}
    assert all(plan.baseline_of(t) is None for t in plan.subset_trials)  # the pretrained model is the baseline


def test_a_pretrained_model_for_in_memory_data_is_built_for_its_channels_and_checked_before_any_work(tmp_path):
    """digits is one channel: the pretrained model's spec carries it, and weights that do not fit stop
    the run in `prepare`, before Ray, selection or training (not in a worker)."""
    import torch

    from overinterp.models import ModelError, create_model
    from overinterp.pipeline.driver import prepare

    one, three = str(tmp_path / "one.pt"), str(tmp_path / "three.pt")
    torch.save(create_model("digits_cnn", num_classes=10, in_channels=1).state_dict(), one)
    torch.save(create_model("digits_cnn", num_classes=10).state_dict(), three)
    settings = dict(dataset="digits", pretrained="digits_cnn", smoke=True, out_dir=str(tmp_path / "out"))
    _, data, plan, _ = prepare(RunConfig(weights=one, **settings))
    source = plan.sources["digits_cnn"]["pretrained"]
    assert data.shape[0] == 1 and source.model == {"name": "digits_cnn", "num_classes": 10, "in_channels": 1, "weights": one}
    assert source.load(torch.device("cpu"))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ModelError, match="does not fit digits_cnn"):
        prepare(RunConfig(weights=three, **settings))
    assert not os.path.exists(tmp_path / "out")


def test_a_pretrained_model_for_streamed_data_is_checked_before_the_listing(tmp_path, monkeypatch):
    """Streamed images decode to RGB: 3-channel weights fit, 1-channel ones stop the run before the
    source is counted (a listing of ImageNet on S3 is ~1,300 requests)."""
    import torch

    from overinterp.models import ModelError, create_model
    from overinterp.pipeline import stream
    from overinterp.pipeline.driver import prepare
    from overinterp.synthetic import write_encoded_parquet

    one, three = str(tmp_path / "one.pt"), str(tmp_path / "three.pt")
    torch.save(create_model("digits_cnn", num_classes=3, in_channels=1).state_dict(), one)
    torch.save(create_model("digits_cnn", num_classes=3).state_dict(), three)
    for split in ("train", "val"):
        write_encoded_parquet(str(tmp_path / f"{split}.parquet"), n=4, num_classes=3, size=8, seed=0)
    settings = dict(train=str(tmp_path / "train.parquet"), val=str(tmp_path / "val.parquet"), pretrained="digits_cnn", num_classes=3,
                    image_size=8, stream=True, out_dir=str(tmp_path / "out"))
    _, _, plan, _ = prepare(RunConfig(weights=three, **settings))
    assert plan.sources["digits_cnn"]["pretrained"].model["in_channels"] == 3
    monkeypatch.setattr(stream, "count_images", lambda *a: pytest.fail("the source was counted before the weights were checked"))
    with pytest.raises(ModelError, match="does not fit digits_cnn"):
        prepare(RunConfig(weights=one, **settings))
