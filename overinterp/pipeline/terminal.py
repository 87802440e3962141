"""What a run prints: our stage lines and progress bars; Ray's, Tune's and MLflow's chatter only
with -v.

Called before Ray starts (some settings are environment variables that Ray's processes read at
start-up). Nothing here hides an error: every logger keeps WARNING or above except the ones named,
which repeat what our own lines say (Ray Data's execution plans, Tune's result tables and its
"operation took 1.1 s" notes on a busy machine) or announce defaults (Ray's token authentication,
MLflow creating its tables).
"""

from __future__ import annotations

import logging
import time
import os
import warnings

VERBOSE = False

# Logger -> level when not verbose.
QUIET_LOGGERS = {
    "ray.data": logging.WARNING,  # "Starting execution of Dataset ..." and its plan, per dataset
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled": ours replace them
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # "Token authentication is enabled"
    "ray.tune": logging.ERROR,  # result tables and "The `process_trial_result` operation took 1.067 s" on a busy machine
    "ray.train": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."
    "alembic": logging.WARNING,
}


def configure(verbose: bool = False) -> None:
    """Set how much the run prints. Call before Ray starts."""
    global VERBOSE
    VERBOSE = verbose
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter honours verbose=0 (no tables)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard loggers nor their hint
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # MLflow resolves a local artifact path two ways and says so on every run: the same source either way.
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")


def quiet_ray_data() -> None:
    """Ray Data's own progress bars off (ours count passes against the plan); call once Ray is up."""
    if VERBOSE:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False  # "Starting execution of Dataset ..." and its plan
    for name, level in QUIET_LOGGERS.items():  # ray.init resets the "ray" loggers' handlers and levels
        logging.getLogger(name).setLevel(level)


def log(msg: str) -> None:
    print(f"[overinterp {time.strftime('%H:%M:%S')}] {msg}", flush=True)
