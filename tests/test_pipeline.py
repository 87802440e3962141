"""The whole pipeline through a real local Ray, on the digits smoke subsample: outputs, MLflow,
resume after a rerun and after lost work."""

import json
import os

import mlflow
import mlflow.artifacts
import mlflow.models
import pytest
from matplotlib.image import imread

from overinterp import store
from overinterp.config import SMOKE_SIZES, ConfigError, RunConfig
from overinterp.pipeline.driver import run as run_pipeline

pytestmark = pytest.mark.ray
N_TRAIN, N_TEST = SMOKE_SIZES


@pytest.fixture(scope="module")
def smoke_run(ray_session, smoke_cli_run):
    """The session's `overinterp run --smoke --seeds 0,1` (the default selectors and fills: the whole
    comparison): its config, out dir and summary (with its MLflow parent run's id)."""
    from mlflow.tracking import MlflowClient

    out, printed, code = smoke_cli_run
    assert code == 0, printed[-3000:]
    cfg = RunConfig(smoke=True, seeds=(0, 1), out_dir=str(out))
    summary = json.load(open(out / "summary.json"))
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("overinterp").experiment_id], "attributes.run_name LIKE 'digits-%'")
    return cfg, out, {**summary, "mlflow_run_id": parent.info.run_id}


def _mtimes(out):
    found = {}
    for d, _, files in os.walk(out):
        for f in files:
            if f == "result.json" or f.endswith(".parquet"):
                found[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return found


def test_outputs(smoke_run):
    cfg, out, summary = smoke_run
    on_disk = json.load(open(out / "summary.json"))
    def trial_accuracy(name: str) -> float:
        return json.load(open(out / "trials" / name / "result.json"))["accuracy"]

    # each condition's accuracies are its trials' own, in seed order
    for cond, trial in (("full", "full"), ("full+dropout", "full-drop0.2"), ("bs-subset", "backselect"), ("bs-subset+road", "backselect-road"),
                        ("random-subset", "random-seed0"), ("bs-positions-only", "backselect-positions")):
        assert summary["accuracy"]["digits_cnn"][cond] == [trial_accuracy(f"digits_cnn-{trial}-s{s}") for s in (0, 1)], cond
    assert set(summary["sis"]["digits_cnn"]) == {"plain", "ensemble", "input_dropout"}
    assert summary["n_keep"] == 4 and summary["hw"] == 64
    md = (out / "summary.md").read_text()
    assert "| digits_cnn |" in md and "## Which pixels carry the signal" in md
    assert (out / "gallery.png").stat().st_size > 1000
    # a gallery column per selector, then the primary's subsets under ROAD fill, random, the primary's SIS
    pct, primary = f"{100 * summary['fraction']:g}%", summary["selector"]
    assert summary["fills"] == ["mean", "road"] and primary == "backselect"
    assert summary["gallery_columns"] == on_disk["gallery_columns"] == [
        "original", *(f"{t} {pct}" for t in summary["selectors"]), f"{primary} {pct}, ROAD fill", f"random {pct}",
        f"SIS τ={summary['tau']:g} ({primary})"]
    for plot in ("accuracy.png", "confidence_vs_removed.png", "sis_sizes.png"):
        assert imread(out / plot)[..., :3].std() > 0.05 and f"]({plot})" in md  # a drawn figure, not a blank one
    comp = summary["comparison"]["digits_cnn"]
    assert [r["selector"] for r in comp["selectors"]] == ["backselect", "perturbation-it300", "gradient", "ig-n50"] == summary["selectors"]
    for row in comp["selectors"] + [comp["random"]]:
        assert set(row["accuracy"]) == {"mean", "road"} and all(len(v) == 2 for v in row["accuracy"].values())
        assert 0 <= row["full_model_accuracy"] <= 1 and 0 <= row["median_confidence"] <= 1
    for row in comp["selectors"]:
        assert len(row["positions"]) == 2 and row["forward_passes_per_image"] > 0
        assert row["images_with_sis"] == 0 or 0 <= row["dilated_median_confidence"] <= 1
    assert comp["selectors"][0]["forward_passes_per_image"] == 64 * 65 // 2  # exact BS on 8x8
    root = str(out / "selections")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        sel = store.read_selections(root, "digits_cnn-s0", "backselect", split, expect_n=n)
        assert sel.curve.shape == (n, 64)
        store.read_selections(root, "none", "random-seed0", split, expect_n=n)
    store.read_selections(root, "digits_cnn-ens2", "backselect", "test", expect_n=N_TEST)
    store.read_selections(root, "digits_cnn-drop0.2-s0", "backselect", "test", expect_n=N_TEST)
    for name in ("digits_cnn-full-s0", "digits_cnn-backselect-s1", "digits_cnn-random-seed0-s0", "digits_cnn-full-drop0.2-s1",
                 "digits_cnn-backselect-positions-s0"):
        assert (out / "trials" / name / "model.pt").exists()


def test_mlflow_parent_and_children(smoke_run):
    from mlflow.tracking import MlflowClient

    cfg, out, summary = smoke_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")  # for the runs:/ URI below
    exp = client.get_experiment_by_name("overinterp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the model-training view
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["fraction"] == "0.05" and parent.info.run_name.startswith("digits-20")
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40 and "digits_cnn" in parent.data.tags["mlflow.note.content"]
    m = parent.data.metrics
    assert {"digits_cnn.full.accuracy_mean", "digits_cnn.full.accuracy_std", "digits_cnn.bs-subset.accuracy_std",
            "digits_cnn.plain.images_with_sis", "digits_cnn.ensemble.accuracy", "digits_cnn.input_dropout.accuracy",
            "digits_cnn.masked.median_confidence", "digits_cnn.selector.ig-n50.full_model_accuracy",
            "digits_cnn.selector.random-seed0.median_confidence", "digits_cnn.selector.backselect.median_confidence"} <= set(m)
    for variant, sis in summary["sis"]["digits_cnn"].items():  # SIS sizes wherever some image has a SIS (2 epochs: few do;
        # test_summary_metrics_of_known_sis_sizes checks the values where the smoke run may have none)
        assert m[f"digits_cnn.{variant}.images_with_sis"] == sis["n_with_sis"]
        for key, field in (("median_sis_pixels", "median_size"), ("median_sis_fraction", "median_fraction")):
            assert (f"digits_cnn.{variant}.{key}" in m) == (sis["n_with_sis"] > 0)
            if sis["n_with_sis"]:
                assert m[f"digits_cnn.{variant}.{key}"] == pytest.approx(sis[field])
    # the cost plan (tracking.log_plan) and the resource plan (issue 8)
    assert m["plan.cost.eta_s"] > 0 and m["plan.cost.forward_passes"] > 0
    assert any(k.startswith("plan.cost.select.") for k in m) and any(k.startswith("plan.cost.train.") for k in m)
    assert [k for k in parent.data.params if k.startswith("resources.")], sorted(parent.data.params)
    (data_input,) = parent.inputs.dataset_inputs
    ds = data_input.dataset
    assert ds.name == "digits-smoke" and len(ds.digest) == 16
    # scikit-learn's bundled file the digits are read from
    assert ds.source_type == "local" and json.loads(ds.source)["uri"].endswith(os.path.join("sklearn", "datasets", "data", "digits.csv.gz"))

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [c.info.run_name for c in children if c.data.tags.get("condition") == "prior"] == ["explain-prior"]  # the smoke run's --explain
    children = [c for c in children if c.data.tags.get("condition") != "prior"]
    by_name = {c.info.run_name: c for c in children}
    # full (+ dropout), and per seed: 4 selectors x (mean, ROAD, positions only) + random x (mean, ROAD)
    assert len(children) == len(by_name) == 2 * 2 + 2 * (4 * 3 + 2)
    for c in children:
        seed = c.data.tags["seed"]
        assert c.data.params["train.seed"] == c.data.params["trial.seed"] == seed
        assert c.info.run_name.endswith(f"-s{seed}") and c.info.status == "FINISHED"
        losses = client.get_metric_history(c.info.run_id, "train_loss")
        assert len(losses) >= 2 and len(client.get_metric_history(c.info.run_id, "val_accuracy")) >= 2
        # logged while it trained, not after the fact: each epoch when it ended, inside the run's real span
        assert c.info.start_time <= losses[0].timestamp <= losses[-1].timestamp <= c.info.end_time
        assert [h.step for h in losses] == list(range(len(losses)))
        assert c.data.tags["dataset"] == "digits" and c.data.tags["variant"] in ("plain", "input-dropout")
        if c.data.tags["condition"] != "full":  # compared with the full-image model of its seed
            base = client.get_run(c.data.tags["baseline_run_id"])
            assert base.info.run_name == f"digits_cnn-full-s{seed}" and base.data.tags["condition"] == "full"
            assert c.data.metrics["baseline_accuracy"] == pytest.approx(base.data.metrics["accuracy"])
    assert {c.data.tags["condition"] for c in children} == {"full", "full+dropout", "random-subset", "random-subset+road"} | {
        f"{sel}-{what}" for sel in ("bs", "perturbation", "gradient", "ig") for what in ("subset", "subset+road", "positions-only")}
    assert by_name["digits_cnn-ig-n50-road-s1"].data.tags["selector"] == "ig-n50"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"summary.md", "summary.json", "gallery.png", "accuracy.png", "confidence_vs_removed.png", "sis_sizes.png",
                         "plan.txt", "explain_vce_0.png", "explain_vce_1.png", *(f"explain_disagree_{i}.png" for i in range(3))}, artifacts  # summary_table.md is gone: summary.md holds the tables
    assert not (out / "summary_table.md").exists()
    plan_txt = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/plan.txt")
    assert "cost (" in plan_txt and "selection" in plan_txt
    assert by_name["digits_cnn-full-drop0.2-s1"].data.tags["variant"] == "input-dropout"
    # real durations: a full-image run ends when its training did (before the subset models started),
    # not when the summary logged its model
    full = [c for c in children if c.data.tags["condition"] in ("full", "full+dropout")]
    first_subset = min(c.info.start_time for c in children if c not in full)
    assert all(c.info.end_time <= first_subset for c in full), [(c.info.run_name, c.info.end_time - first_subset) for c in full]


def test_full_image_models_are_logged_with_their_signature(smoke_run):
    """Every full-image model (plain and input dropout, each seed) is an MLflow PyTorch model whose
    signature takes (B, 1, 8, 8) normalised digits and returns (B, 10) logits; subset models are not."""
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    cfg, out, summary = smoke_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("overinterp")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    full = {c.info.run_name: c for c in children if c.data.tags["condition"] in ("full", "full+dropout")}
    assert sorted(full) == ["digits_cnn-full-drop0.2-s0", "digits_cnn-full-drop0.2-s1", "digits_cnn-full-s0", "digits_cnn-full-s1"]
    for c in children:
        assert (c.data.tags.get("overinterp.model_logged") == "1") == (c.info.run_name in full), c.info.run_name
    for name, c in full.items():
        info = mlflow.models.get_model_info(f"runs:/{c.info.run_id}/model")
        assert info.signature is not None, name
        (inp,), (outp,) = info.signature.inputs.inputs, info.signature.outputs.inputs
        assert tuple(inp.shape) == (-1, 1, 8, 8) and tuple(outp.shape) == (-1, 10), (name, inp.shape, outp.shape)
    model = mlflow.pytorch.load_model(f"runs:/{full['digits_cnn-full-s0'].info.run_id}/model")
    assert tuple(model(torch.zeros(3, 1, 8, 8)).shape) == (3, 10)


def test_the_summary_reads_each_stored_selection_once(smoke_run, monkeypatch, tmp_path):
    """The analysis (SIS sizes, the selector table, the gallery, the plots) reads each test
    selection it uses once, and gives the run's summary again."""
    from collections import Counter

    from overinterp.pipeline import analysis
    from overinterp.pipeline.driver import prepare
    from overinterp.pipeline.memory import InMemoryBackend
    from overinterp.pipeline.trial import load_result

    cfg, out, summary = smoke_run
    rcfg, data, plan, resources = prepare(cfg)
    full = {s.name: load_result(rcfg.out_dir, s) for s in plan.full_trials}
    subsets = {s.name: load_result(rcfg.out_dir, s) for s in plan.subset_trials}
    reads, real = Counter(), store.read_selections
    monkeypatch.setattr(store, "read_selections", lambda root, model, sel, split, *a, **kw: (
        reads.update([(model, sel, split)]), real(root, model, sel, split, *a, **kw))[1])
    monkeypatch.setattr(analysis, "copy_out", lambda paths, out_dir: None)  # the run's own gallery and plots stay as they are
    backend = InMemoryBackend(rcfg, plan, data, resources)
    study = analysis.Analysis(rcfg, plan, backend.test_images())
    again = study.summary(full, subsets, backend.baseline(study.test), backend.skipped_images())
    study.reports(again, str(tmp_path))
    sources = plan.sources["digits_cnn"]
    expected = ({(sources["plain"].tag, t, "test") for t in summary["selectors"]}
                | {(s.tag, plan.primary, "test") for s in sources.values()} | {("none", plan.random_tag, "test")})
    assert len(expected) == 4 + 2 + 1 and reads == dict.fromkeys(expected, 1)
    run_summary = {k: v for k, v in summary.items() if k not in ("mlflow_run_id", "explain")}  # explain: its own stage
    assert json.dumps(again, sort_keys=True) == json.dumps(run_summary, sort_keys=True)  # NaN-safe, unlike ==


def test_summary_metrics_of_known_sis_sizes():
    """The parent's metrics from a hand-built summary: SIS medians only where some image has a SIS."""
    from overinterp.pipeline.tracking import _metric_key, summary_metrics

    summary = {"accuracy": {"cnn": {"full": [0.9, 0.7], "full+dropout": [0.8], "bs-subset": []}},
               "sis": {"cnn": {"plain": {"n_with_sis": 3, "median_size": 5, "median_fraction": 5 / 64},
                               "ensemble": {"n_with_sis": 0, "median_size": float("nan"), "median_fraction": float("nan")}}},
               "variant_accuracy": {"cnn": {"plain": 0.9, "ensemble": 0.95}},
               "masked_confidence": {"cnn": {"median_confidence": 0.6, "accuracy": 0.5}}}
    m = {_metric_key(k): v for k, v in summary_metrics(summary).items()}
    assert m["cnn.full.accuracy_mean"] == pytest.approx(0.8) and m["cnn.full.accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert m["cnn.full_plus_dropout.accuracy_std"] == 0.0 and "cnn.bs-subset.accuracy_mean" not in m
    assert m["cnn.plain.median_sis_pixels"] == 5 and m["cnn.plain.median_sis_fraction"] == pytest.approx(5 / 64)
    assert m["cnn.plain.images_with_sis"] == 3 and m["cnn.ensemble.images_with_sis"] == 0
    assert "cnn.ensemble.median_sis_pixels" not in m and "cnn.ensemble.median_sis_fraction" not in m  # no NaN metrics
    assert m["cnn.ensemble.accuracy"] == 0.95 and m["cnn.masked.median_confidence"] == 0.6 and m["cnn.masked.accuracy"] == 0.5


def test_rerun_reuses_finished_work(smoke_run, capsys):
    cfg, out, summary = smoke_run
    before = _mtimes(out)
    again = run_pipeline(cfg)
    assert _mtimes(out) == before  # no trial retrained, no image reselected
    assert again["accuracy"] == summary["accuracy"]
    printed = capsys.readouterr().out
    assert "[full] 4 of 4 trials already finished" in printed and "; 0 to go" in printed


def test_lost_work_is_redone_without_duplicates(smoke_run):
    cfg, out, summary = smoke_run
    shard_dir = out / "selections" / "digits_cnn-s0" / "backselect" / "test"
    shard = sorted(shard_dir.glob("part-*.parquet"))[0]
    shard.unlink()
    (out / "trials" / "digits_cnn-random-seed0-s1" / "result.json").unlink()
    run_pipeline(cfg)
    ids = store.raw_image_ids(str(out / "selections"), "digits_cnn-s0", "backselect", "test")
    assert sorted(ids.tolist()) == list(range(N_TEST))  # every image in exactly one stored row: a repeat would show here
    store.read_selections(str(out / "selections"), "digits_cnn-s0", "backselect", "test", expect_n=N_TEST)
    assert (out / "trials" / "digits_cnn-random-seed0-s1" / "result.json").exists()


def test_a_truncated_checkpoint_is_retrained_with_a_warning(smoke_run, caplog):
    cfg, out, summary = smoke_run
    ckpt = out / "trials" / "digits_cnn-backselect-s0" / "model.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="overinterp.pipeline.trial"):
        again = run_pipeline(cfg)
    assert any("digits_cnn-backselect-s0" in r.message and "retrained" in r.message for r in caplog.records)
    assert len(ckpt.read_bytes()) > 100
    assert again["accuracy"] == summary["accuracy"]  # the same seeds train the same model


def test_a_garbage_checkpoint_is_retrained_through_the_command_line(smoke_run, capfd, caplog):
    """Random bytes where a finished trial's model.pt was (not a truncated file): `overinterp run`
    with the same flags warns, retrains that trial alone and exits 0; no other trial's result and no
    stored selection is touched."""
    from overinterp.cli import main

    cfg, out, summary = smoke_run
    trial = out / "trials" / "digits_cnn-gradient-s1"
    (trial / "model.pt").write_bytes(os.urandom(4096))
    before = _mtimes(out)
    with caplog.at_level("WARNING", logger="overinterp.pipeline.trial"):
        code = main(["run", "--smoke", "--seeds", "0,1", "--out", str(out)])
    printed = capfd.readouterr()
    warned = [r.getMessage() for r in caplog.records if r.name == "overinterp.pipeline.trial"]
    warned += [l for l in (printed.out + printed.err).splitlines() if "will be retrained" in l]
    assert code == 0, printed.err[-2000:]
    assert warned and all("digits_cnn-gradient-s1" in w and "will be retrained" in w for w in warned), warned
    after = _mtimes(out)
    assert {p for p in before if after.get(p) != before[p]} == {str(trial / "result.json")}  # that trial alone
    assert set(after) == set(before)
    assert json.load(open(out / "summary.json"))["accuracy"] == summary["accuracy"]


def test_other_settings_in_same_out_dir_are_refused(smoke_run):
    cfg, out, _ = smoke_run
    with pytest.raises(ConfigError, match="other settings"):
        run_pipeline(RunConfig(smoke=True, seeds=(0, 1), out_dir=str(out), fraction=0.1))


def test_a_streamed_folder_run_trains_selects_and_reports_as_an_in_memory_one(ray_session, tmp_path, capsys):
    """--stream on a folder: the full-image model trains through Ray Train, selection explains it,
    and the same analysis writes the same summary keys, plots and gallery as an in-memory run."""
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "photos"), n_per_class=4, num_classes=2, size=20)
    out = tmp_path / "out"
    cfg = RunConfig(dataset="imagefolder", data_root=str(tmp_path / "photos"), stream=True, image_size=8, models=("digits_cnn",),
                    seeds=(0,), input_dropout=0.0, selectors=("bgsis", "gradient"), pixels_per_step=16, fills=("mean",), epochs=1,
                    batch_size=4, select_batch=4, gallery=2, out_dir=str(out))
    summary = run_pipeline(cfg)
    printed = capsys.readouterr().out
    assert f"source: imagefolder {tmp_path / 'photos'}: streamed, as --stream asks" in printed
    assert set(summary["accuracy"]["digits_cnn"]) == {"full", "bgsis-subset", "bgsis-positions-only", "gradient-subset",
                                                      "gradient-positions-only", "random-subset"}
    assert summary["analysed_test_images"] == [8, 8] and summary["sis"]["digits_cnn"]["plain"]["n_images"] == 8
    assert [r["selector"] for r in summary["comparison"]["digits_cnn"]["selectors"]] == ["bgsis-k16-keep0.05", "gradient"]
    assert summary["gallery_columns"][0] == "original" and len(summary["gallery_columns"]) == 5
    for f in ("summary.md", "gallery.png", "accuracy.png", "confidence_vs_removed.png", "sis_sizes.png"):
        assert (out / f).exists(), f
    root = str(out / "selections")
    for model, sel, split in store.list_selections(root):
        ids = store.raw_image_ids(root, model, sel, split)
        assert len(ids) == len(set(ids.tolist())) == 8, (model, sel, split)  # every image once
    result = json.load(open(out / "trials" / "digits_cnn-full-s0" / "result.json"))
    assert result["val_images"] == 8 and "workers" in result  # a Ray Train trial, not a Tune one


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "in-memory"])
def test_image_files_that_do_not_decode_are_left_out_and_listed_alike_by_either_backend(ray_session, tmp_path, stream, monkeypatch):
    import tempfile

    from overinterp.synthetic import write_imagefolder

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the driver draws its report files

    write_imagefolder(str(tmp_path / "data"), n_per_class=3, num_classes=2, size=16)
    truncated = tmp_path / "data" / "train" / "n00000000" / "00000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:120])
    (tmp_path / "data" / "val" / "n00000001" / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    summary = run_pipeline(RunConfig(dataset="imagefolder", data_root=str(tmp_path / "data"), image_size=16, smoke=True, seeds=(0,),
                                     selectors=("gradient",), fills=("mean",), stream=stream, out_dir=str(out)))
    assert summary["skipped_images"] == json.load(open(out / "summary.json"))["skipped_images"] == {
        "train": {"count": 1, "first": [{"path": "n00000000/00000.jpg", "reason": "OSError: Truncated File Read"}]},
        "test": {"count": 1, "first": [{"path": "n00000001/notes.jpg", "reason": "not an image PIL can read"}]}}
    assert "n00000000/00000.jpg: OSError: Truncated File Read" in (out / "summary.md").read_text()
    assert summary["analysed_test_images"] == [6, 6]  # the 6 test images; notes.jpg was one file more
    assert not [p for p in os.listdir(scratch) if p.startswith("overinterp-report-")]  # the run left no scratch files behind
