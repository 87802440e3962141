"""overinterp/pipeline/explain_stage.py and the explain flags: which models each question compares,
the Parquet schema, the stage's work without Ray on untrained checkpoints (prior resumed, answers
deterministic), the galleries, the flags' errors — and, through the session's smoke run
(`overinterp run --smoke --explain vce,disagree`, conftest.smoke_cli_run), summary.json,
summary.md, the galleries and MLflow."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("diffusers")  # the `explain` extra

from overinterp.cli import build_parser, config_from_args  # noqa: E402
from overinterp.config import ConfigError, RunConfig  # noqa: E402
from overinterp.data import load_dataset  # noqa: E402
from overinterp.models import ModelSpec, build, save_checkpoint  # noqa: E402
from overinterp.pipeline import analysis  # noqa: E402
from overinterp.pipeline.explain_stage import (  # noqa: E402
    EXPLAIN_SCHEMA, ExplainSettings, answer_questions, answer_table, explain_models, galleries_from_store, gallery_files, read_answers,
    tile,
)
from overinterp.pipeline.plan import make_plan  # noqa: E402


def digits_plan(out, **changes):
    cfg = RunConfig(out_dir=str(out), **{"seeds": (0, 1), **changes}).resolved()
    return cfg, make_plan(cfg, (1, 8, 8), {"train": 100, "test": 20}, 10)


def test_the_questions_compare_full_with_subset_dropout_and_seed_models(tmp_path):
    _, plan = digits_plan(tmp_path)
    models = explain_models(plan)
    assert {k: (m.label, t.label) for k, (m, t) in models.vce.items()} == {"full s0": ("full s0", "full s1"),
                                                                          "bs-subset s0": ("bs-subset s0", "bs-subset s1")}
    assert list(models.pairs) == ["full vs bs-subset", "plain vs input dropout", "seed 0 vs seed 1"]
    assert [b.label for _, b in models.pairs.values()] == ["bs-subset s0", "dropout s0", "full s1"]
    assert models.pairs["full vs bs-subset"][1].source.checkpoints[0].endswith("trials/digits_cnn-backselect-s0/model.pt")
    assert len({r.source.tag for r in models.refs()}) == 5  # full s0, s1, subset s0, s1, dropout s0
    _, one_seed = digits_plan(tmp_path, seeds=(3,), input_dropout=0.0)
    models = explain_models(one_seed)
    assert [t for _, t in models.vce.values()] == [None, None] and list(models.pairs) == ["full vs bs-subset"]


def test_answer_table_has_the_schema_and_round_trips(tmp_path):
    rows = {"image": np.zeros((2, 1, 8, 8), np.uint8), "start_image": np.full((2, 1, 8, 8), 255, np.uint8),
            "target": np.array([3, 4]), "seed": np.array([-1, -1]), "p_target": np.array([0.95, 0.2]),
            "success": np.array([True, False]), "l2": np.array([1.0, 2.0]), "image_index": np.array([0, 0]),
            "label": np.array([1, 1]), "method": np.array(["noise", "noise"]), "objective_start": np.array([3.0, 2.0]),
            "objective_end": np.array([0.1, 1.5])}
    table = answer_table("vce", "", rows)
    assert table.schema.equals(EXPLAIN_SCHEMA, check_metadata=True)
    assert table.column("p_first").to_pylist() == [0.95, 0.2] and table.column("p_second").null_count == 2
    os.makedirs(tmp_path / "explain")
    pq.write_table(table, tmp_path / "explain" / "vce.parquet")
    assert read_answers(str(tmp_path), "vce.parquet").column("target").to_pylist() == [3, 4]
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "explain" / "old.parquet")
    with pytest.raises(ValueError, match="another format"):
        read_answers(str(tmp_path), "old.parquet")


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A digits plan with untrained checkpoints for every model the stage loads, and its test images."""
    out = tmp_path_factory.mktemp("explain-stage")
    cfg, plan = digits_plan(out)
    models = explain_models(plan)
    for i, ref in enumerate({r.source.tag: r for r in models.refs()}.values()):
        torch.manual_seed(i)
        spec = ModelSpec("digits_cnn", 10, 1)
        save_checkpoint(ref.source.checkpoints[0], spec, build(spec))
    d = load_dataset("digits", None, False, None)
    n = 12
    test = analysis.TestImages(np.arange(n), d.images["test"][:n], d.labels["test"][:n].astype(np.int64), d.mean, d.std,
                               tuple(d.classes), n)
    settings = ExplainSettings(("vce", "disagree"), "universal", images=2, prior_steps=3, generator=None, guidance_steps=2)
    return out, plan, models, test, d.images["train"][:64], settings


def test_the_stage_answers_every_question_and_resumes_its_prior(stage_inputs):
    out, plan, models, test, train, settings = stage_inputs
    first = answer_questions(settings, str(out), models, test, train, plan.num_classes)
    section = first["section"]
    assert list(section["vce"]) == ["full s0", "bs-subset s0"]
    for i, (label, v) in enumerate(section["vce"].items()):
        assert v["n"] == 2 * 9 and v["file"] == f"vce-{i}.parquet"  # 2 images × the 9 other classes
        assert v["transfer_to"] == {"full s0": "full s1", "bs-subset s0": "bs-subset s1"}[label]
        vce = read_answers(str(out), v["file"])
        assert vce.num_rows == 18 and vce.column("subject").to_pylist() == [label] * 18
        assert vce.column("objective_end").null_count == 0 and vce.column("seed").to_pylist() == [-1] * 18  # VCEs start from inversions
    assert list(section["disagree"]) == list(models.pairs)
    for i, (name, d) in enumerate(section["disagree"].items()):
        assert d["file"] == f"disagree-{i}.parquet" and len(d["directions"]) == 2
        t = read_answers(str(out), d["file"])
        assert t.num_rows == 4 and set(t.column("subject").to_pylist()) == {name}  # 2 seeds × 2 directions
    assert [(k, label) for k, label, _ in first["galleries"]] == [("vce", "full s0"), ("vce", "bs-subset s0"),
                                                                   *(("disagree", p) for p in models.pairs)]
    assert first["prior"]["steps"] == 3 and first["prior"]["samples"].shape == (16, 1, 8, 8)
    assert os.path.exists(out / "explain" / "prior" / "prior.pt")
    more = ExplainSettings(**{**settings.__dict__, "prior_steps": 4})
    again = answer_questions(more, str(out), models, test, train, plan.num_classes)
    assert again["prior"]["steps"] == 4  # resumed: one more step, not four
    assert [s for s, _ in again["prior"]["loss_curve"]] == [4]
    # what a rerun that reuses the answers pictures: the same rows, read back from the Parquet files
    back = galleries_from_store(str(out), again["section"])
    assert [(k, label) for k, label, _ in back] == [(k, label) for k, label, _ in again["galleries"]]
    for (_, _, rows), (_, _, read) in zip(again["galleries"], back):
        assert np.array_equal(rows["image"], read["image"]) and np.array_equal(rows["target"], read["target"])


def test_galleries_picture_each_question(stage_inputs, tmp_path, monkeypatch):
    from PIL import Image

    import overinterp.report as report

    drawn = []  # (first column, {column title: images}) of each gallery, (N, H, W, C)
    real = report.gallery_figure
    monkeypatch.setattr(report, "gallery_figure", lambda first, panels, *a, **k: drawn.append((first, panels)) or real(first, panels, *a, **k))
    out, plan, models, test, train, settings = stage_inputs
    res = answer_questions(settings, str(out), models, test, train, plan.num_classes)
    paths = gallery_files(res["galleries"], test.classes, str(tmp_path))
    hwc = lambda a: a.transpose(1, 2, 0)
    (kind, _, r), (first, panels) = res["galleries"][0], drawn[0]
    t, columns = int(np.sum(r["image_index"] == 0)), list(panels.values())  # rows: t targets per test image
    assert kind == "vce" and len(columns) == plan.num_classes
    for row in range(len(r["target"])):  # each counterfactual in its target's column, beside its test image
        i = row // t
        assert np.array_equal(first[i], hwc(r["start_image"][row])) and np.array_equal(columns[r["target"][row]][i], hwc(r["image"][row]))
    (kind, _, r), (first, panels) = res["galleries"][2], drawn[2]
    assert kind == "disagree"
    for d, images in zip(dict.fromkeys(r["direction"]), panels.values()):  # one column per direction, its own images
        assert np.array_equal(images, r["image"][r["direction"] == d].transpose(0, 2, 3, 1))
    assert [os.path.basename(p) for p in paths] == ["explain_vce_0.png", "explain_vce_1.png", "explain_disagree_0.png",
                                                    "explain_disagree_1.png", "explain_disagree_2.png"]
    w, h = Image.open(paths[0]).size
    assert abs(w / h - 11 / 2) < 0.2  # 2 test images × (the image + one column per class)
    w, h = Image.open(paths[2]).size
    assert abs(w / h - 3 / 2) < 0.2  # 2 seeds × (unguided + both directions)
    assert tile(np.zeros((5, 1, 8, 8), np.uint8)).shape == (16, 32, 1)


def test_explain_flags_are_checked_where_they_enter():
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["run", "--explain", "vce,disagree", "--explain-method", "universal", "--prior-steps", "50"]))
    assert cfg.explain == ("vce", "disagree") and cfg.explain_method == "universal" and cfg.prior_steps == 50
    with pytest.raises(ConfigError, match="--explain takes distinct questions from vce, disagree"):
        RunConfig(explain=("vce", "dreams"))
    with pytest.raises(ConfigError, match="add --explain"):
        RunConfig(generator="/models/ddpm")
    with pytest.raises(ConfigError, match="--explain-images must be >= 1"):
        RunConfig(explain=("vce",), explain_images=0)
    with pytest.raises(SystemExit):
        parse(["run", "--explain-method", "dps"])
    # the explain stage keeps its own record: changing it never invalidates selections or trials
    assert RunConfig(explain=("vce",), prior_steps=5).fingerprint() == RunConfig().fingerprint()


def test_a_streamed_run_needs_a_generator():
    for streamed in ({"train": "a.parquet", "val": "b.parquet"}, {"dataset": "imagefolder", "data_root": "photos", "stream": True}):
        with pytest.raises(ConfigError, match="--explain on a streamed source needs --generator"):
            RunConfig(explain=("vce",), **streamed)
        RunConfig(explain=("vce",), generator="/models/ddpm", **streamed)  # a generator answers it


# --- through the session's smoke run ---------------------------------------------------------------

def test_a_smoke_run_reports_the_explain_stage(smoke_cli_run):
    from mlflow.tracking import MlflowClient

    out, printed, code = smoke_cli_run
    assert code == 0, printed[-3000:]
    summary = json.load(open(out / "summary.json"))
    ex = summary["explain"]
    assert ex["settings"]["questions"] == ["vce", "disagree"] and ex["vce"]["full s0"]["n"] == 2 * 9
    assert ex["galleries"] == ["explain_vce_0.png", "explain_vce_1.png", "explain_disagree_0.png", "explain_disagree_1.png",
                               "explain_disagree_2.png"]
    assert all((out / g).exists() for g in ex["galleries"])
    md = (out / "summary.md").read_text()
    assert "## What the models learned to look for" in md and "![Explain vce 0](explain_vce_0.png)" in md
    assert "| bs-subset s0 | 18 |" in md
    assert "| seed 0 vs seed 1 | full s0>full s1 |" in md
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("overinterp").experiment_id
    (prior,) = client.search_runs([exp], "attributes.run_name = 'explain-prior'")
    assert [m.step for m in client.get_metric_history(prior.info.run_id, "prior_loss")] == [ex["settings"]["prior_steps"]]
    (parent,) = client.search_runs([exp], "attributes.run_name LIKE 'digits-%'")
    assert parent.data.metrics["explain.vce.full s0.success_rate"] == pytest.approx(ex["vce"]["full s0"]["success_rate"], abs=1e-4)
    assert any(k.startswith("explain.seed 0 vs seed 1.") for k in parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"explain_vce_0.png", "explain_vce_1.png", "explain_disagree_0.png"} <= artifacts


def test_the_plan_prices_the_explain_stage(tmp_path):
    from overinterp.costplan import CostPlan, estimate_explain
    from overinterp.pipeline.costing import explain_cost

    cfg, plan = digits_plan(tmp_path, explain=("vce", "disagree"))
    # 6 test images × 9 other classes × 2 models, and 3 pairs × 2 directions × 6 seeds: 144 images; the prior on the 100 train images
    noise = explain_cost(cfg, plan)
    assert noise == pytest.approx(estimate_explain(pixels=64, prior_steps=800, prior_batch=100, images=144, method="noise",
                                                   steps=10, iterations=50))
    assert explain_cost(*digits_plan(tmp_path)) == 0.0
    universal = explain_cost(*digits_plan(tmp_path, explain=("vce", "disagree"), explain_method="universal"))
    generator = explain_cost(*digits_plan(tmp_path, explain=("vce", "disagree"), generator="/models/ddpm"))
    assert generator < noise and universal < noise and explain_cost(*digits_plan(tmp_path, explain=("vce",))) < noise
    cost = CostPlan(explain_s=noise)
    assert cost.eta_seconds == noise and "explain    ≈ " in cost.describe() and cost.as_params()["cost.explain_eta_s"] == round(noise, 1)


def test_a_generator_replaces_the_trained_prior(stage_inputs, tmp_path):
    from overinterp.explain.prior import PriorConfig, make_unet, save_generator

    out, plan, models, test, train, settings = stage_inputs
    config = PriorConfig(channels=(8, 16), steps=1)
    torch.manual_seed(0)
    save_generator(make_unet(config, 8, 1), config, str(tmp_path / "ddpm"))  # a tiny random diffusers DDPMPipeline on disk
    with_generator = ExplainSettings(("vce",), "universal", images=1, prior_steps=5, generator=str(tmp_path / "ddpm"), guidance_steps=2)
    res = answer_questions(with_generator, str(tmp_path / "out"), models, test, None, plan.num_classes)
    assert res["prior"] == {"generator": str(tmp_path / "ddpm")} and res["section"]["vce"]["full s0"]["n"] == 9
    assert not (tmp_path / "out" / "explain" / "prior").exists()  # nothing trained

