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
