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
