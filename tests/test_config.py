"""RunConfig: impossible values fail on construction, naming the fix, without touching the world."""

import pytest

from overinterp.config import ConfigError, RunConfig


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


def test_bad_names_fail_on_construction():
    with pytest.raises(ConfigError, match="unknown data set"):
        RunConfig(dataset="mnist")
    with pytest.raises(ConfigError, match="sqlite"):
        RunConfig(tracking_uri="file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="is a file store"):
        RunConfig(tracking_uri="mlruns")  # a bare path is a file store to MLflow
    for uri in ("databricks", "databricks-uc", "databricks://profile", "postgresql://u@h/db", "sqlite:///x/mlflow.db", "http://h:5000"):
        assert RunConfig(tracking_uri=uri).tracking_uri == uri
    with pytest.raises(ConfigError, match="--train and --val go together"):
        RunConfig(train="a")
    with pytest.raises(ConfigError, match="--stream takes imagefolder or parquet"):
        RunConfig(dataset="cifar10", stream=True)
    with pytest.raises(ConfigError, match="Parquet sources always stream"):
        RunConfig(dataset="parquet", stream=False)
    with pytest.raises(ConfigError, match="--pretrained resnet20 has no named weights: give --weights FILE"):
        RunConfig(pretrained="resnet20")
    with pytest.raises(ConfigError, match="has no named weights"):
        RunConfig(pretrained="resnet20", weights="DEFAULT")
    assert RunConfig(pretrained="resnet20", weights="r20.pt").explained == "resnet20"


def test_a_streamed_trial_is_not_given_gpus_it_cannot_use():
    with pytest.raises(ConfigError, match=r"--gpus-per-trial 8 on a streamed run: .* 7 of its 8 would idle: give --workers-per-trial 8 --gpus-per-trial 1"):
        RunConfig(dataset="parquet", gpus_per_trial=8)
    with pytest.raises(ConfigError, match=r"give --workers-per-trial 4 --gpus-per-trial 1"):
        RunConfig(dataset="imagefolder", stream=True, gpus_per_trial=2, workers_per_trial=2)
    RunConfig(dataset="parquet", gpus_per_trial=1, workers_per_trial=8)  # DDP: one GPU per worker
    RunConfig(dataset="cifar10", gpus_per_trial=8)  # in memory, a trial's GPUs split each batch (DataParallel)
    RunConfig(dataset="parquet", gpus_per_trial=8, gpus_per_worker=0)  # a CPU run: the flag asks for nothing


def test_resolved_makes_local_paths_absolute(tmp_path, monkeypatch):
    """Trials run in their own folders: a relative --train, --val or --weights file would not be found there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    c = RunConfig(train="data/train", val="data/val", pretrained="tv:resnet18", weights="w.pt", out_dir="o").resolved()
    assert (c.train, c.val, c.weights, c.out_dir) == tuple(str(tmp_path / p) for p in ("data/train", "data/val", "w.pt", "o"))
    c = RunConfig(train="s3://b/train", val="s3://b/val", pretrained="tv:resnet18", out_dir="s3://b/o",
                  tracking_uri="http://127.0.0.1:5000").resolved()
    assert (c.train, c.val, c.weights, c.out_dir) == ("s3://b/train", "s3://b/val", "DEFAULT", "s3://b/o")


def test_resolved_fills_defaults(tmp_path):
    c = RunConfig(dataset="digits", out_dir=str(tmp_path)).resolved()
    assert c.models == ("digits_cnn",) and c.epochs == 30 and c.augment is False and c.pretrained is None
    assert c.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert RunConfig(smoke=True).resolved().epochs == 2


@pytest.mark.parametrize("kwargs, source", [
    (dict(), "digits"),
    (dict(dataset="imagefolder", data_root="photos"), "imagefolder"),
    (dict(train="s3://b/train", val="s3://b/val"), "imagefolder"),
    (dict(train="t.parquet", val="v.parquet"), "parquet"),
    (dict(dataset="parquet", train="t", val="v"), "parquet"),
])
def test_the_source_kind(kwargs, source):
    assert RunConfig(**kwargs).source == source
    assert RunConfig(**kwargs).resolved().dataset == source


def test_a_pretrained_model_is_explained_and_trained_by_default():
    c = RunConfig(train="t", val="v", pretrained="tv:resnet18").resolved()
    assert c.pretrained == "tv:resnet18" and c.weights == "DEFAULT" and c.models == ("tv:resnet18",) and c.image_size == 224
    c = RunConfig(train="t", val="v", models=("tv:resnet50",), weights="w.pt").resolved()
    assert c.pretrained == "tv:resnet50" and c.weights == "w.pt"
    with pytest.raises(ConfigError, match="--weights needs the model"):
        RunConfig(train="t", val="v", weights="w.pt")


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


def test_the_selection_batch_is_given_or_sized_by_the_run():
    """--select-batch wins; in memory 64; a streamed run's call holds ~32 images of 224 px, 8 to 1,024 images."""
    from overinterp.config import streamed_select_batch

    assert RunConfig(select_batch=5).selection_batch(True) == RunConfig(select_batch=5).selection_batch(False) == 5
    assert RunConfig().selection_batch(False) == 64
    assert [streamed_select_batch(s) for s in (8, 39, 40, 64, 224, 299, 800)] == [1024, 1024, 1003, 392, 32, 17, 8]
    assert RunConfig(train="a", val="b", image_size=224).selection_batch(True) == 32
    assert RunConfig(train="a", val="b", image_size=8).selection_batch(True) == 1024


def test_smoke_fits_a_full_size_k_to_its_small_images():
    # --pixels-per-step 300 suits 224-px images; --smoke cuts a folder's images to 16 px (256 pixels)
    cfg = RunConfig(dataset="imagefolder", data_root="/d", pixels_per_step=300, selectors=("bgsis",), smoke=True).resolved()
    assert cfg.image_size == 16 and cfg.pixels_per_step == 256
