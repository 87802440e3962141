"""The run's count of selection passes made inside batches: a Ray actor the selection workers report
to and the driver's progress bar reads (overinterp/pipeline/select_stage.py).

A module of its own that imports only Ray: the actor's process imports the module its class is
defined in, and the selection stage's (torch, Ray Data, the store) costs ~4 CPU-seconds to import,
which on a 2-core machine the selection workers starting beside it wait for.
"""

from __future__ import annotations

import ray


class PassCounter:
    """Ray actor (no CPU) of the passes each worker has made in each selection pass, finished
    batches and the running one; the driver's bar reads a pass's total (progress inside a batch:
    exact BS on one 32x32 image is 524,800 passes, minutes to hours)."""

    def __init__(self):
        self.made: dict[str, dict[str, float]] = {}  # pass id -> worker -> passes

    def add(self, pass_id: str, worker: str, passes: float) -> None:
        made = self.made.setdefault(pass_id, {})
        made[worker] = made.get(worker, 0.0) + passes

    def total(self, pass_id: str) -> float:
        return sum(self.made.get(pass_id, {}).values())

    def forget(self, pass_id: str) -> None:
        self.made.pop(pass_id, None)


def run_pass_counter():
    """The PassCounter of this driver's Ray job, started by its first selection pass and kept for
    the rest (restarted if its node is lost); a new Ray (another job, or the driver's node new) gets
    its own. The handle that made it is held here: Ray destroys an actor once that handle is gone."""
    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id())
    if key not in _RUN_COUNTER:
        _RUN_COUNTER.clear()
        _RUN_COUNTER[key] = ray.remote(num_cpus=0)(PassCounter).options(max_restarts=-1).remote()
    return _RUN_COUNTER[key]


_RUN_COUNTER: dict = {}  # (job id, the driver's node id) -> run_pass_counter's actor
