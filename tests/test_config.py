"""RunConfig: impossible values and names fail at the boundary, naming the fix."""

import json

import pytest

from overinterp.config import ConfigError, RunConfig, check_reuse


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction": 0.0}, r"--fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"--fraction"),
        ({"tau": -0.1}, r"--tau must be in \[0, 1\]"),
        ({"tau": 1.01}, r"--tau"),
        ({"input_dropout": 1.0}, r"--input-dropout"),
        ({"seeds": ()}, r"--seeds"),
        ({"seeds": (1, 1)}, r"distinct"),
        ({"pixels_per_step": 0}, r"--pixels-per-step"),
        ({"epochs": 0}, r"--epochs"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kwargs)


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="unknown data set"):
        RunConfig(dataset="mnist").check()
    with pytest.raises(ConfigError, match="unknown model"):
        RunConfig(models=("resnet21",)).check()
    with pytest.raises(ConfigError, match="--data-root"):
        RunConfig(dataset="cifar10").check()
    with pytest.raises(ConfigError, match="sqlite"):
        RunConfig(tracking_uri="file:///tmp/mlruns").check()
    RunConfig(models=("tv:resnet50",)).check()  # torchvision names are accepted


def test_resolved_fills_defaults(tmp_path):
    c = RunConfig(dataset="digits", out_dir=str(tmp_path)).resolved()
    assert c.models == ("digits_cnn",) and c.epochs == 30 and c.augment is False
    assert c.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert RunConfig(smoke=True).resolved().epochs == 2


def test_reuse_check(tmp_path):
    path = str(tmp_path / "config.json")
    a = RunConfig(out_dir=str(tmp_path)).resolved()
    check_reuse(a, path)
    check_reuse(a, path)  # same settings: fine
    check_reuse(RunConfig(out_dir=str(tmp_path), tau=0.5, gallery=2).resolved(), path)  # summary-only changes: fine
    with pytest.raises(ConfigError, match=r"other settings \(fraction\)"):
        check_reuse(RunConfig(out_dir=str(tmp_path), fraction=0.1).resolved(), path)
    assert json.load(open(path))["fraction"] == 0.05


@pytest.mark.parametrize("kwargs, planned", [
    (dict(dataset="imagefolder", exact_tail=0.5), "backselect plans 8,513 at 16×16 px with --exact-tail 0.5 even at k = 256: "
                                                  "use --exact-tail 0.37 or less"),
    (dict(dataset="cifar10", exact_tail=0.1, selectors=("bgsis",)), "bgsis plans 5,358 at 32×32 px with --exact-tail 0.1 even at k = 1024: "
                                                                    "use --exact-tail 0.09 or less"),  # 103·104/2 + 2
    (dict(dataset="digits", selector_options={"perturbation": {"iterations": 10_000}}), "perturbation plans 10,065 at 8×8 px"),
])
def test_smoke_refuses_what_exceeds_its_stated_pass_bound(tmp_path, kwargs, planned):
    """k is raised to keep --smoke within SMOKE_MAX_PASSES; an exact tail (or a selector's options)
    can exceed it whatever k is: refused in one line naming the fix, not run past the bound."""
    from overinterp.config import SMOKE_MAX_PASSES

    with pytest.raises(ConfigError, match=f"--smoke keeps every selector within {SMOKE_MAX_PASSES:,} forward passes") as e:
        RunConfig(smoke=True, data_root=str(tmp_path), **kwargs).resolved()
    assert planned in str(e.value) and "\n" not in str(e.value)


def test_smoke_within_the_bound_with_a_fitting_tail(tmp_path):
    from overinterp.config import SMOKE_MAX_PASSES
    from overinterp.selection.cost import planned_passes

    cfg = RunConfig(dataset="imagefolder", data_root=str(tmp_path), smoke=True, exact_tail=0.37).resolved()
    for name, params in cfg.selection_params().items():
        assert planned_passes(name, 16 * 16, params)[0] <= SMOKE_MAX_PASSES, name
