"""Preflight: the checks that touch the world, once, in the order a user wants to hear them."""

import json

import pytest

from overinterp.config import ConfigError, RunConfig
from overinterp.pipeline import preflight as pf
from overinterp.pipeline.preflight import preflight, record_settings, refuse_other_settings
from overinterp.synthetic import write_encoded_parquet, write_imagefolder


def test_names_then_inputs_then_outputs(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):  # a bad name is reported before a missing root
        preflight(RunConfig(dataset="cifar10", models=("resnet21",), out_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--data-root"):
        preflight(RunConfig(dataset="cifar10", out_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--train /no/such does not exist"):
        preflight(RunConfig(train="/no/such", val="/no/such", out_dir=str(tmp_path / "o")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        preflight(RunConfig(out_dir=str(tmp_path / "file")))
    assert not (tmp_path / "o").exists()  # nothing written


def test_splits_are_found_under_the_data_root(tmp_path):
    write_imagefolder(str(tmp_path / "photos"), n_per_class=2, num_classes=2, size=12)
    cfg = preflight(RunConfig(dataset="imagefolder", data_root=str(tmp_path / "photos"), out_dir=str(tmp_path / "o")))
    assert cfg.train == str(tmp_path / "photos" / "train") and cfg.val == str(tmp_path / "photos" / "val")
    write_encoded_parquet(str(tmp_path / "pq" / "train.parquet"), n=4, num_classes=2, size=12, seed=0)
    write_encoded_parquet(str(tmp_path / "pq" / "val.parquet"), n=4, num_classes=2, size=12, seed=1)
    cfg = preflight(RunConfig(dataset="parquet", data_root=str(tmp_path / "pq"), out_dir=str(tmp_path / "o")))
    assert cfg.train.endswith("train.parquet") and cfg.dataset == "parquet"
    with pytest.raises(ConfigError, match="has no val split"):
        (tmp_path / "half" / "train").mkdir(parents=True)
        preflight(RunConfig(dataset="imagefolder", data_root=str(tmp_path / "half"), out_dir=str(tmp_path / "o")))


def test_a_folder_of_parquet_files_is_a_parquet_source(tmp_path):
    write_encoded_parquet(str(tmp_path / "train" / "part-0.parquet"), n=4, num_classes=2, size=12, seed=0)
    write_encoded_parquet(str(tmp_path / "val" / "part-0.parquet"), n=4, num_classes=2, size=12, seed=1)
    cfg = preflight(RunConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val"), out_dir=str(tmp_path / "o")))
    assert cfg.dataset == "parquet"


def test_parquet_named_over_image_folders_is_refused_naming_the_data_set_they_are(tmp_path):
    write_imagefolder(str(tmp_path / "photos"), n_per_class=2, num_classes=2, size=12)
    with pytest.raises(ConfigError, match=r"--dataset parquet: .*/photos/train holds no \.parquet file: for ImageFolder splits .* --dataset imagefolder"):
        preflight(RunConfig(dataset="parquet", data_root=str(tmp_path / "photos"), out_dir=str(tmp_path / "o")))


def test_the_tracking_server_is_probed_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pf, "check_tracking_server", lambda uri, timeout=pf.TRACKING_TIMEOUT_S: calls.append(uri))
    preflight(RunConfig(out_dir=str(tmp_path / "o"), tracking_uri="http://127.0.0.1:9"))
    assert calls == ["http://127.0.0.1:9"]


def test_settings_are_recorded_and_other_settings_refused(tmp_path):
    a = RunConfig(out_dir=str(tmp_path)).resolved()
    assert refuse_other_settings(a) is False
    record_settings(a)
    record_settings(a)  # same settings: fine
    record_settings(RunConfig(out_dir=str(tmp_path), tau=0.5, gallery=2).resolved())  # summary-only changes: fine
    with pytest.raises(ConfigError, match=r"other settings \(fraction\)"):
        record_settings(RunConfig(out_dir=str(tmp_path), fraction=0.1).resolved())
    assert json.load(open(tmp_path / "config.json"))["fraction"] == 0.05
    with pytest.raises(ConfigError, match=r"other settings \(fraction\)"):  # preflight says so before any work
        preflight(RunConfig(out_dir=str(tmp_path), fraction=0.1))


def test_the_backend_is_chosen_by_size():
    from overinterp.pipeline.driver import IN_MEMORY_SHARE, choose_backend

    folder = RunConfig(dataset="imagefolder", data_root="photos").resolved()
    fits = int(1e9 * IN_MEMORY_SHARE) // (3 * 224 * 224)
    assert choose_backend(folder, fits, 224, memory=10**9)[0] is False
    stream, why = choose_backend(folder, fits + 1, 224, memory=10**9)
    assert stream is True and "exceeds" in why and "--no-stream overrides" in why
    assert choose_backend(RunConfig().resolved(), None, 8) == (False, "digits is held in memory")
    assert choose_backend(RunConfig(train="t", val="v").resolved(), None, 224)[0] is True
    assert choose_backend(RunConfig(dataset="imagefolder", data_root="photos", stream=True).resolved(), 10, 224)[0] is True
    assert choose_backend(RunConfig(train="t", val="v", stream=False).resolved(), 10, 224)[0] is False


def test_workers_per_trial_on_a_run_held_in_memory_is_said_to_do_nothing(tmp_path, capsys):
    from overinterp.pipeline.driver import prepare

    prepare(RunConfig(workers_per_trial=2, smoke=True, out_dir=str(tmp_path / "o")))
    assert "--workers-per-trial 2 applies to streamed trials: this run holds its images in memory" in capsys.readouterr().out
    prepare(RunConfig(smoke=True, out_dir=str(tmp_path / "o")))
    assert "--workers-per-trial" not in capsys.readouterr().out


def test_step_flags_without_a_removal_selector_are_said_to_do_nothing(tmp_path, capsys):
    from overinterp.pipeline.driver import prepare

    prepare(RunConfig(selectors=("gradient", "ig"), pixels_per_step=4, exact_tail=0.5, smoke=True, out_dir=str(tmp_path / "o")))
    assert ("--pixels-per-step 4 and --exact-tail 0.5: only backselect and bgsis remove pixels in steps; "
            "gradient, ig rank the pixels once, so this run does not use them") in capsys.readouterr().out
    prepare(RunConfig(selectors=("gradient", "bgsis"), pixels_per_step=4, smoke=True, out_dir=str(tmp_path / "o")))
    assert "--pixels-per-step" not in capsys.readouterr().out
    prepare(RunConfig(selectors=("gradient",), exact_tail=0.1, smoke=True, out_dir=str(tmp_path / "o")))
    assert "--exact-tail 0.1: only backselect and bgsis remove pixels in steps; gradient ranks the pixels once" in capsys.readouterr().out
    prepare(RunConfig(selectors=("gradient",), smoke=True, out_dir=str(tmp_path / "o")))
    assert "remove pixels in steps" not in capsys.readouterr().out
