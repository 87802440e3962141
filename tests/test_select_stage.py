"""Selection's own retry: which errors mean a lost worker (retried on the images not yet stored)."""

import ray.exceptions

from overinterp.pipeline.select_stage import lost_worker


def test_a_lost_worker_is_found_through_rays_wrapping():
    died = ray.exceptions.ActorDiedError()
    wrapped = RuntimeError("Ray Data execution failed")
    wrapped.__cause__ = died
    outer = ValueError("outer")
    outer.__context__ = wrapped
    assert lost_worker(outer) is died
    assert isinstance(lost_worker(ray.exceptions.WorkerCrashedError()), ray.exceptions.WorkerCrashedError)


def test_a_bug_is_not_mistaken_for_a_lost_worker():
    bug = ValueError("shapes do not match")
    bug.__cause__ = KeyError("x")
    assert lost_worker(bug) is None


def test_a_selection_worker_drops_ids_already_stored(ray_session, tmp_path):
    """A retried pass hands the actors the ids stored meanwhile; they select and store only the rest
    (the filter lives in the actor: a separate Ray Data filter task would need a free CPU)."""
    from dataclasses import asdict

    import numpy as np

    from overinterp import store
    from overinterp.pipeline.plan import SelectionSource
    from overinterp.pipeline.select_stage import SelectionWorker
    from overinterp.selection import EngineConfig, selector_params

    source = SelectionSource(tag="m", model={"name": "digits_cnn", "num_classes": 10, "in_channels": 1})
    worker = SelectionWorker(asdict(source), str(tmp_path), "test", (0.5,), (0.25,), "backselect", selector_params("backselect", 4),
                             asdict(EngineConfig()), threads=1, skip_ids=np.array([1, 3], dtype=np.int64))
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    out = worker({"image_id": np.arange(4), "label": np.zeros(4, np.int64), "image": images})
    assert out["image_id"].tolist() == [0, 2] and len(out["seconds"]) == 2
    assert store.done_ids(str(tmp_path), "m", "backselect-k4", "test") == {0, 2}
    assert len(worker({"image_id": np.array([1, 3]), "label": np.zeros(2, np.int64), "image": images[:2]})["image_id"]) == 0
