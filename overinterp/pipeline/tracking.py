"""MLflow, the reviewer's way: one parent run per output directory, one child run per trial,
logged while it trains.

- The parent is named `<dataset>-<date-time>`, carries every setting as a parameter, the git commit
  (`mlflow.source.git.commit`), the data set as an input (source and digest), a description
  (`mlflow.note.content`) with the headline result, the summary metrics and the report artifacts.
  Its experiment carries `mlflow.experimentKind = custom_model_development` (a model-training
  experiment; MLflow 3.17's UI still opens in its GenAI view until "Model training" is clicked) and
  a saved runs-table view, "accuracies" (SAVED_VIEW_COLUMNS), under Views.
- Each trial's child run is created by a Tune callback in the driver when the trial starts, gets
  `train_loss` and `val_accuracy` per epoch (step = epoch) as Tune reports them, and ends when the
  trial does: real start and end times. Workers never talk to MLflow (on a cluster the tracking
  server listens on the head's loopback only). Tags: condition, variant, dataset, selector, seed,
  and `baseline_run_id` — the run it is compared with.
- Telling the truth after a crash: a parent of the same --out still RUNNING belongs to a dead run
  (this run holds the output's lock), so it is marked KILLED; a rerun with the same settings
  continues the newest parent of those settings (killed, failed or finished) instead of opening a
  second one, and a child run is looked up by name before one is created, so no trial appears
  twice in a parent. Other settings open a new parent, tagged with the previous one.

Default store: a SQLite file in --out (MLflow 3 refuses the old file store); on a cluster the
tracking server's URI. Artifacts of a SQLite store go beside it in <out_dir>/mlartifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import statistics
import subprocess
import time
from dataclasses import asdict
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune

from overinterp.pipeline.trial import TrialSpec

log = logging.getLogger(__name__)
# MLflow's SQL store logs each database error with its traceback and then raises it: the run reports
# what it raises (a full disk in one line, see driver.run), so the log would only repeat it
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
OUT_TAG, ROLE_TAG, FP_TAG = "overinterp.out_dir", "overinterp.role", "overinterp.fingerprint"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_sqlite_store(uri: str, cache_dir: Optional[str] = None) -> None:
    """A tracking URI sqlite:///PATH whose file does not exist yet starts as a copy of an empty store
    at MLflow's newest schema, made once per schema in `cache_dir` ($XDG_CACHE_HOME/overinterp or
    ~/.cache/overinterp): MLflow builds a new store by creating its first tables and then running
    every schema migration since (2-4 s on 2 cores, for every new --out). MLflow then checks the
    schema and adds its Default experiment as it does for any new store. Best effort: where the
    template or the copy cannot be made (no cache folder, a full disk, a failing SQLite), nothing
    half-written is left behind and MLflow builds the store itself."""
    import shutil

    from mlflow.store.db import utils as db

    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or "?" in path or os.path.exists(path):
        return
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "overinterp")
    template = os.path.join(cache_dir, f"mlflow-{mlflow.__version__}-{db._get_latest_schema_revision()}-empty.db")
    parts = [f"{template}.{os.getpid()}.part", f"{path}.part"]  # whole files or none: another run may be copying the template
    try:
        if not os.path.exists(template):
            os.makedirs(cache_dir, exist_ok=True)
            engine = db.create_sqlalchemy_engine_with_retry(f"sqlite:///{parts[0]}")
            try:
                db._initialize_tables(engine)  # the tables alone: the Default experiment names this store's artifact root
            finally:
                engine.dispose()
            os.replace(parts[0], template)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.copyfile(template, parts[1])
        os.replace(parts[1], path)
    except Exception as e:  # OSError, or SQLAlchemy's errors from SQLite (a full disk while building the template)
        for part in parts:
            with contextlib.suppress(OSError):
                os.remove(part)
        log.debug("no MLflow store template (%s): MLflow builds %s itself", e, path)


def _param(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _metric_key(k: str) -> str:
    """MLflow keys take letters, digits, _ - . / and spaces: '+' spelled out, anything else '_'."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k.replace("+", "_plus_"))


# Accuracies, their differences and confidences as MLflow's tables show them: 0.9753, not
# 0.9752747252747253 (a fraction of 364 test images). summary.json and result.json keep them exact;
# counts, SIS sizes, losses and the plan's numbers go to MLflow as they are.
SHOWN_DECIMALS = 4


def shown(value: float) -> float:
    """An accuracy or a confidence in [0, 1] (or a difference of two) rounded to SHOWN_DECIMALS places."""
    return round(float(value), SHOWN_DECIMALS)


def fingerprint_digest(config) -> str:
    return hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# The runs-table columns a reviewer wants. MLflow has no per-experiment default view (the columns
# picked live in the browser), but it keeps *saved views* in the experiment as tags
# mlflow.sharedViewState.<key> = {"name", "createdAt", "state": JSON of {"selectedColumns": [...]}};
# everyone opening the store finds them under Views, or at
# #/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key> (tests/test_mlflow_ui.py).
SAVED_VIEW_KEY = "accuracies"
SAVED_VIEW_COLUMNS = ("metrics.`accuracy`", "metrics.`baseline_accuracy`", "metrics.`accuracy_minus_baseline`",
                      "tags.`condition`", "tags.`selector`", "tags.`fill`", "tags.`seed`", "tags.`variant`")


class Tracker:
    """Logs a pipeline run; a context manager around the whole run (see the module docstring).

    config: RunConfig (tracking_uri, experiment, out_dir, fingerprint()).
    previous_holder: the lock document of a dead run this run took the output from, if any.
    """

    def __init__(self, config, dataset: str, resources=None, previous_holder: Optional[dict] = None):
        self.config, self.dataset, self.resources, self.previous_holder = config, dataset, resources, previous_holder
        start_sqlite_store(config.tracking_uri)
        mlflow.set_tracking_uri(config.tracking_uri)
        self.client = MlflowClient(config.tracking_uri)
        exp = self.client.get_experiment_by_name(config.experiment)
        if exp is None:
            artifacts = None
            if config.tracking_uri.startswith("sqlite:") and "://" not in config.out_dir:
                artifacts = "file://" + os.path.join(config.out_dir, "mlartifacts")
            self.experiment_id = self.client.create_experiment(config.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        self.client.set_experiment_tag(self.experiment_id, *KIND_TAG)  # marks it a model-training experiment
        view = json.dumps({"name": SAVED_VIEW_KEY, "createdAt": 0, "state": json.dumps({"selectedColumns": list(SAVED_VIEW_COLUMNS)})})
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{SAVED_VIEW_KEY}", view)  # Views -> "accuracies"
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self.run_id: Optional[str] = None  # the parent run's
        self.children: dict[str, str] = {}  # trial name -> run id
        self.resumed = False

    # --- the parent ---
    def __enter__(self) -> "Tracker":
        of_out = f"tags.`{OUT_TAG}` = '{self.config.out_dir}' and tags.`{ROLE_TAG}` = 'parent'"
        parents = self.client.search_runs([self.experiment_id], filter_string=of_out, order_by=["attributes.start_time DESC"],
                                          max_results=100)
        for r in parents:
            if r.info.status == "RUNNING":  # we hold the output's lock: its run is dead
                self.client.set_terminated(r.info.run_id, "KILLED")
                log.warning("MLflow run %s of %s was still RUNNING from a run that died: marked KILLED", r.info.run_id, self.config.out_dir)
        fp = fingerprint_digest(self.config)
        again = next((r for r in parents if r.data.tags.get(FP_TAG) == fp), None)  # newest first
        if again is not None:
            self.resumed = True
            self.run_id = again.info.run_id
            mlflow.start_run(run_id=self.run_id)
            old, params = again.data.params, self._params()
            mlflow.log_params({k: v for k, v in params.items() if k not in old})
            changed = {f"overinterp.rerun_changed.{k}": v for k, v in params.items() if k in old and old[k] != v}
            mlflow.set_tags({"overinterp.resumed_at": time.strftime("%Y-%m-%d %H:%M:%S"), **changed})
            for child in self.client.search_runs([self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
                                                 max_results=5000):
                self.children.setdefault(child.data.tags.get("mlflow.runName", ""), child.info.run_id)
        else:
            name = f"{self.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
            tags = {OUT_TAG: self.config.out_dir, ROLE_TAG: "parent", FP_TAG: fp, "dataset": self.dataset,
                    "mlflow.source.git.commit": git_commit()}
            if parents:
                tags["overinterp.previous_run_id"] = parents[0].info.run_id
            run = mlflow.start_run(run_name=name, tags=tags)
            self.run_id = run.info.run_id
            mlflow.log_params(self._params())
        if self.previous_holder:
            mlflow.set_tag("overinterp.took_over_from_pid", str(self.previous_holder.get("pid")))
        return self

    def log_plan(self, text: str, cost) -> None:
        """The printed plan as plan.txt, its numbers (passes, ETAs) as metrics: a resumed run's new
        ETA may differ, and MLflow params cannot change."""
        mlflow.log_text(text, "plan.txt")
        numbers = {k: float(v) for k, v in cost.as_params().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics({k if k.startswith("plan.") else f"plan.{k}": v for k, v in numbers.items()})

    def _params(self) -> dict:
        params = {k: _param(v) for k, v in asdict(self.config).items()}
        if self.resources is not None:
            params.update({k: _param(v) for k, v in self.resources.as_params().items()})
        return params

    def __exit__(self, exc_type, exc, tb):
        # a run stopped by a signal or Ctrl-C (KeyboardInterrupt) was killed, not failed: its work so far is sound
        mlflow.end_run(status="FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    def log_data(self, info: dict) -> None:
        """The data set as the parent's input: its source and digest (and schema, when in memory).

        info: {name, source, digest} and, for data held in memory, {images, labels} of the train split.
        """
        import mlflow.data
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        source = resolve_dataset_source(info["source"])
        if "images" in info:
            ds = mlflow.data.from_numpy(info["images"], source=source, targets=info["labels"], name=info["name"], digest=info["digest"])
        else:
            ds = MetaDataset(source, name=info["name"], digest=info["digest"])
        mlflow.log_input(ds, context="training")

    # --- children ---
    def child(self, spec: TrialSpec, start_time_ms: Optional[int] = None) -> tuple[str, bool]:
        """(run id, created now) of a trial's child run; an existing one is reused, never doubled."""
        if spec.name in self.children:
            return self.children[spec.name], False
        tags = {"condition": spec.condition, "variant": spec.variant, "dataset": self.dataset, "model": spec.model,
                "selector": spec.selector_tag or "none", "fill": spec.fill if spec.subset else "none", "seed": str(spec.seed)}
        run = self.client.create_run(self.experiment_id, start_time=start_time_ms, run_name=spec.name,
                                     tags={"mlflow.parentRunId": self.run_id, **tags})
        self.children[spec.name] = run.info.run_id
        train = {k: getattr(self.config, k) for k in ("epochs", "batch_size", "lr", "augment") if hasattr(self.config, k)}
        params = {**{f"trial.{k}": _param(v) for k, v in asdict(spec).items()}, "trial.condition": spec.condition,
                  **{f"train.{k}": _param(v) for k, v in {**train, "seed": spec.seed}.items()}}
        self.client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        return run.info.run_id, True

    # --- results ---
    def log_results(self, plan, full: dict, subsets: dict, summary: dict, files: list[str], models: Optional[dict] = None) -> None:
        """Every trial's child run complete (created from result.json for trials finished by an earlier
        run), baselines linked, the summary's metrics, the description and the artifacts."""
        results = {**full, **subsets}
        pretrained = summary.get("baseline", {}).get("full")
        for spec in list(plan.full_trials) + list(plan.subset_trials):
            r = results[spec.name]
            run_id, created = self.child(spec, start_time_ms=int(1000 * (r.get("finished_at", time.time()) - r["seconds"])))
            if created:  # finished before this parent existed: its history from result.json
                for epoch, loss in enumerate(r.get("losses", [])):
                    self.client.log_metric(run_id, "train_loss", loss, step=epoch)
                for epoch, acc in enumerate(r.get("val_accuracies", [])):
                    self.client.log_metric(run_id, "val_accuracy", shown(acc), step=epoch)
            base = plan.baseline_of(spec)
            base_acc = results[base.name]["accuracy"] if base is not None else (pretrained if not plan.full_trials else None)
            metrics = {"accuracy": shown(r["accuracy"]), "seconds": round(r["seconds"], 1)}
            if base_acc is not None:  # the difference of the exact accuracies, then rounded
                metrics.update(baseline_accuracy=shown(base_acc), accuracy_minus_baseline=shown(r["accuracy"] - base_acc))
            for k, v in metrics.items():
                self.client.log_metric(run_id, k, v)
            if base is not None:
                self.client.set_tag(run_id, "baseline_run_id", self.child(base)[0])
            elif not plan.full_trials:
                self.client.set_tag(run_id, "baseline_run_id", self.run_id)  # the pretrained model's accuracy lives on the parent
            if models and spec.name in models and self.client.get_run(run_id).data.tags.get("overinterp.model_logged") != "1":
                ended = self.client.get_run(run_id).info
                self._log_model(run_id, *models[spec.name])
                if ended.status == "FINISHED":  # logging reopens the run: keep the trial's own end, not the summary's
                    self.client.set_terminated(run_id, "FINISHED", end_time=ended.end_time)
            status = self.client.get_run(run_id).info.status
            if status != "FINISHED":
                end = r.get("finished_at")
                self.client.set_terminated(run_id, "FINISHED", end_time=int(1000 * end) if created and end else None)
        mlflow.log_metrics({_metric_key(k): v for k, v in summary_metrics(summary).items()})
        mlflow.set_tag("mlflow.note.content", describe(summary, plan))
        for f in files:
            mlflow.log_artifact(f)

    def log_prior(self, prior: dict) -> None:
        """The explain stage's diffusion prior as a child run "explain-prior": its loss per
        checkpoint interval and a tile of unguided samples (a --generator: its name only)."""
        if not prior:
            return  # reused from an earlier run: logged then
        name = "explain-prior"
        if name not in self.children:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, "condition": "prior"})
            self.children[name] = run.info.run_id
        run_id = self.children[name]
        if "generator" in prior:
            self.client.set_tag(run_id, "generator", prior["generator"])
        else:
            for step, loss in prior["loss_curve"]:
                self.client.log_metric(run_id, "prior_loss", loss, step=step)
            self.client.set_tag(run_id, "prior_steps", str(prior["steps"]))  # a tag: a resumed prior trains on
            from overinterp.pipeline.explain_stage import tile

            self.client.log_image(run_id, tile(prior["samples"]), "prior_samples.png")
        self.client.set_terminated(run_id, "FINISHED")

    def _log_model(self, run_id: str, model, example) -> None:
        """A full-image model as an MLflow PyTorch model with its signature (input: normalised
        images, output: logits)."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            out = model(example).numpy()
        with mlflow.start_run(run_id=run_id, nested=True):
            # the pt2 format (torch.export of the graph, traced on the example) needs no pickle to load
            mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example.numpy(), out), input_example=example.numpy(),
                                     serialization_format="pt2", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self.client.set_tag(run_id, "overinterp.model_logged", "1")


class TrialLogger(tune.Callback):
    """Driver-side Tune callback: a trial's child run follows it live (start, epochs, end)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.runs: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id, created = self.tracker.child(TrialSpec(**trial.config["trial"]), start_time_ms=int(time.time() * 1000))
        if not created:
            self.tracker.client.update_run(run_id, status="RUNNING")
        self.runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or "epoch" not in result:
            return
        step = int(result["epoch"])
        for k, value in (("train_loss", float), ("val_accuracy", shown)):
            if k in result and not result.get("done"):
                self.tracker.client.log_metric(run_id, k, value(result[k]), step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        if trial.trial_id in self.runs:
            self.tracker.client.set_terminated(self.runs[trial.trial_id], status)


def summary_metrics(summary: dict) -> dict:
    """The parent's metrics: accuracy mean and std over seeds per condition, SIS sizes per
    variant, each variant's accuracy, confidence on masked images, the pretrained baseline.
    Accuracies and confidences are rounded for reading (`shown`); SIS sizes and counts are exact."""
    m = {}
    for model, conds in summary["accuracy"].items():
        for cond, vals in conds.items():
            if vals:
                m[f"{model}.{cond}.accuracy_mean"] = shown(statistics.fmean(vals))
                m[f"{model}.{cond}.accuracy_std"] = shown(statistics.stdev(vals)) if len(vals) > 1 else 0.0
    for model, variants in summary.get("sis", {}).items():
        for variant, s in variants.items():
            if s["n_with_sis"]:
                m[f"{model}.{variant}.median_sis_pixels"] = s["median_size"]
                m[f"{model}.{variant}.median_sis_fraction"] = s["median_fraction"]
            m[f"{model}.{variant}.images_with_sis"] = s["n_with_sis"]
    for model, variants in summary.get("variant_accuracy", {}).items():
        for variant, acc in variants.items():
            m[f"{model}.{variant}.accuracy"] = shown(acc)
    for model, c in summary.get("masked_confidence", {}).items():
        m[f"{model}.masked.median_confidence"] = shown(c["median_confidence"])
        m[f"{model}.masked.accuracy"] = shown(c["accuracy"])
    for model, comp in summary.get("comparison", {}).items():  # the selector table, one metric per cell
        for row in comp["selectors"] + [comp["random"]]:
            for key in ("full_model_accuracy", "median_confidence", "median_sis_size", "dilated_median_confidence"):
                value = row.get(key)
                if value is not None and value == value:  # NaN: no image had a SIS
                    m[f"{model}.selector.{row['selector']}.{key}"] = value if key == "median_sis_size" else shown(value)
    for name, value in summary.get("baseline", {}).items():
        m[f"baseline.{name}"] = shown(value)
    explain = summary.get("explain") or {}
    for label, vce in explain.get("vce", {}).items():
        for key, value in vce.items():
            if isinstance(value, (int, float)) and value == value:  # not the labels, not NaN
                m[f"explain.vce.{label}.{key}"] = shown(value) if isinstance(value, float) else value
    for pair, d in explain.get("disagree", {}).items():
        for direction, measures in d["directions"].items():
            for key in ("mean_gap", "unguided_mean_gap", "real_top_gap", "share_beyond_real", "success"):
                m[f"explain.{pair}.{direction}.{key}"] = shown(measures[key])
    return m


def describe(summary: dict, plan) -> str:
    """The parent's description: what ran, and the headline result."""
    pct = f"{100 * summary['fraction']:g}%"
    lines = [f"overinterp on {summary['dataset']}: models {', '.join(plan.models)}, seeds {', '.join(map(str, plan.seeds))}; "
             f"subsets keep {pct} of pixels ({summary['n_keep']} of {summary['hw']}), selected by {summary['selector']}.", ""]
    for model, conds in summary["accuracy"].items():
        parts = [f"{c} {100 * statistics.fmean(v):.1f}%" for c, v in conds.items() if v]
        lines.append(f"- {model}: test accuracy " + ", ".join(parts))
    if summary.get("baseline"):
        b = summary["baseline"]
        lines.append(f"- pretrained {summary.get('model')}: {100 * b['full']:.1f}% on full images, {100 * b['own_subsets']:.1f}% on its own subsets")
    lines += ["", "Child runs: one per trained model; `baseline_run_id` links each to the run it is compared with."]
    return "\n".join(lines)
