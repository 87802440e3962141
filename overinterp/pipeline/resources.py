"""What the Ray cluster offers, so GPU requests are made only where GPUs exist.

On a CPU-only cluster a GPU request never schedules and Ray waits silently; every stage asks here.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class Resources:
    cpus: int
    gpus: int

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def workers(self, cpus_per_worker: int = 1) -> int:
        """Actors for a stage: one per GPU, else one per `cpus_per_worker` CPUs."""
        return self.gpus if self.use_gpu else max(1, self.cpus // cpus_per_worker)

    def per_worker(self, cpus_per_worker: int = 1) -> dict:
        """Ray resource request of one worker ({"num_cpus", "num_gpus"})."""
        return {"num_cpus": cpus_per_worker, "num_gpus": 1 if self.use_gpu else 0}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Resources:
    """Connect to (or start) Ray once and report its resources.

    address: None starts or joins a local Ray ("auto" when RAY_ADDRESS is set, as under
    `ray job submit`).
    """
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    res = ray.cluster_resources()
    return Resources(cpus=int(res.get("CPU", 1)), gpus=int(res.get("GPU", 0)))
