"""MLflow: one parent run per pipeline run, one child run per trial with its baseline accuracy.

Default store is a local SQLite file (MLflow 3 refuses the old file store); on a cluster pass the
tracking server's URI. Artifacts of a SQLite store go beside it in <out_dir>/mlartifacts.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict

import mlflow



def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flat_params(config) -> dict[str, str]:
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in asdict(config).items()}


class Tracker:
    """Logs a pipeline run. Use as a context manager around the whole run.

    config: any config dataclass with tracking_uri, experiment and out_dir (RunConfig,
    ImageNetConfig); all its fields are logged as the parent run's parameters.
    """

    def __init__(self, config, run_name: str):
        self.config, self.run_name = config, run_name
        mlflow.set_tracking_uri(config.tracking_uri)
        if mlflow.get_experiment_by_name(config.experiment) is None:
            artifacts = None
            if config.tracking_uri.startswith("sqlite:") and "://" not in config.out_dir:
                artifacts = "file://" + os.path.join(config.out_dir, "mlartifacts")
            mlflow.create_experiment(config.experiment, artifact_location=artifacts)
        mlflow.set_experiment(config.experiment)
        self.parent = None

    def __enter__(self) -> "Tracker":
        self.parent = mlflow.start_run(run_name=self.run_name)
        mlflow.log_params(_flat_params(self.config))
        mlflow.set_tags({"git_commit": git_commit(), "out_dir": self.config.out_dir})
        return self

    def __exit__(self, exc_type, exc, tb):
        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")
        return False

    @property
    def run_id(self) -> str:
        return self.parent.info.run_id

    def log_trial(self, result: dict, baseline_accuracy: float | None, train_config: dict) -> None:
        """A child run: the trial's spec and training config, its accuracy and its baseline's."""
        with mlflow.start_run(run_name=result["name"], nested=True):
            mlflow.log_params({**{f"trial.{k}": v for k, v in result["spec"].items()}, **{f"train.{k}": v for k, v in train_config.items()}})
            metrics = {"accuracy": result["accuracy"], "train_loss": result["train_loss"], "seconds": result["seconds"]}
            if baseline_accuracy is not None:
                metrics["baseline_accuracy"] = baseline_accuracy
                metrics["accuracy_minus_baseline"] = result["accuracy"] - baseline_accuracy
            mlflow.log_metrics(metrics)
            mlflow.set_tags({"condition": result["spec"]["condition"], "model": result["spec"]["model"]})

    def log_summary(self, summary: dict, files: list[str], table: str) -> None:
        metrics = {}
        for model, accs in summary["accuracy"].items():
            for cond, vals in accs.items():
                if vals:
                    metrics[f"{model}.{cond}.mean_accuracy"] = sum(vals) / len(vals)
        for name, value in summary.get("baseline", {}).items():
            metrics[f"baseline.{name}"] = value
        for model, variants in summary.get("sis", {}).items():
            for variant, s in variants.items():
                if s["n_with_sis"]:
                    metrics[f"{model}.{variant}.median_sis_fraction"] = s["median_fraction"]
        mlflow.log_metrics({k.replace(":", "_"): v for k, v in metrics.items()})
        mlflow.log_text(table, "summary_table.md")
        for f in files:
            mlflow.log_artifact(f)
