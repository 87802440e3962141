"""Selection's own retry: which errors mean a lost worker (retried on the images not yet stored)."""


import pytest
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


def _job(tag: str = "m", split: str = "test") -> dict:
    """A SelectionWorker's job: BS with k = 4 by a seeded digits_cnn named `tag`."""
    from dataclasses import asdict

    from overinterp.pipeline.plan import SelectionSource
    from overinterp.selection import selector_params

    source = SelectionSource(tag=tag, model={"name": "digits_cnn", "num_classes": 10, "in_channels": 1})
    return dict(source=asdict(source), split=split, selector="backselect", params=selector_params("backselect", 4), pass_scale=1.0)


def test_a_selection_worker_serves_every_job_of_a_batch(ray_session, tmp_path):
    """Rows of two jobs in one batch (Ray Data's batches cross its blocks): each job's images are
    selected by its model and stored under its own model and split, and counted in a row of their own."""
    from dataclasses import asdict

    import numpy as np

    from overinterp import store
    from overinterp.pipeline.select_stage import SelectionWorker
    from overinterp.selection import EngineConfig

    worker = SelectionWorker([_job("m", "test"), _job("n", "train")], str(tmp_path), (0.5,), (0.25,), asdict(EngineConfig()), threads=1)
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    out = worker({"job": np.array([1, 0, 1, 1]), "image_id": np.array([5, 6, 7, 8]), "label": np.zeros(4, np.int64), "image": images})
    # the driver gets each job's counts, not a row per image
    assert out["job"].tolist() == [0, 1] and out["images"].tolist() == [1, 3] and (out["seconds"] > 0).all()
    assert store.done_ids(str(tmp_path), "m", "backselect-k4", "test").tolist() == [6]
    assert store.done_ids(str(tmp_path), "n", "backselect-k4", "train").tolist() == [5, 7, 8]
    assert sorted(worker.models) == ["m", "n"]  # each model loaded on first use
    assert worker({"image_id": np.arange(0), "label": np.zeros(0, np.int64), "image": images[:0]})["images"].tolist() == [0]


def test_a_selection_worker_returns_a_row_per_image_that_did_not_decode(ray_session, tmp_path):
    """Undecodable rows come back with their path and reason (the driver lists them); the good ones
    are selected, stored and counted in the call's one summary row."""
    from dataclasses import asdict

    import numpy as np

    from overinterp import store
    from overinterp.pipeline.select_stage import SelectionWorker
    from overinterp.selection import EngineConfig

    worker = SelectionWorker([_job()], str(tmp_path), (0.5,), (0.25,), asdict(EngineConfig()), threads=1)
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    out = worker({"image_id": np.arange(3), "label": np.zeros(3, np.int64), "image": images,
                  "path": np.array(["a.png", "b.png", "c.png"], dtype=object), "error": np.array(["", "truncated", ""], dtype=object)})
    assert out["job"].tolist() == [0, 0] and out["images"].tolist() == [2, 0] and out["path"].tolist() == ["", "b.png"] and out["error"].tolist() == ["", "truncated"]
    assert out["seconds"][1] == 0
    assert store.done_ids(str(tmp_path), "m", "backselect-k4", "test").tolist() == [0, 2]


# --- progress from inside a batch: worker -> PassCounter -> driver's bar --------------------------

class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class _FakeCounter:
    """A PassCounter's interface without Ray: records what a worker sends."""

    def __init__(self):
        self.sent = []
        self.add = _Remote(lambda pass_id, key, n: self.sent.append((pass_id, n)))


def test_a_worker_forwards_passes_at_most_every_interval(monkeypatch):
    import overinterp.pipeline.select_stage as ss

    monkeypatch.setattr(ss.ray, "get", lambda ref, **kw: ref)  # the fake counter's calls return values, not refs
    clock, counter = _Clock(), _FakeCounter()
    f = ss.PassForwarder(counter, "pass-1", scale=1.5, interval=2.0, clock=clock)
    for t in range(10):  # 100 passes every 0.5 s for 5 s, over batches: the worker's running total
        clock.t = 0.5 * t
        f(100)
    assert counter.sent == [("pass-1", 750.0), ("pass-1", 600.0)]  # at 2.0 s (5 calls) and 4.0 s (4 more), scaled
    assert f.pending == 100  # not yet sent: the driver counts it from the batch's result


def test_the_driver_shows_the_larger_of_results_and_reports_never_back():
    import io
    import threading

    from overinterp.pipeline.select_stage import watch_progress
    from overinterp.progress import Progress

    bar = Progress(10_000, "passes", file=io.StringIO(), interval=1e9)
    # (passes of the batches whose results arrived, the workers' reported total) per poll: the
    # workers report as they go; a task's results arrive when it ends (5000 at once), and a report
    # may lag the results (the fourth poll)
    polls = [(0, 1200.0), (0, 3400.0), (0, 3400.0), (5000, 4800.0), (5000, 5800.0), ("boom", None)]
    stop, shown, now = threading.Event(), [], {}

    def finished():
        now["poll"] = polls.pop(0)
        return now["poll"][0] if polls else 0

    def reported():
        if not polls:
            stop.set()
            raise RuntimeError("counter gone")  # a lost counter: the poll is skipped, nothing raised
        return now["poll"][1]

    update_to = bar.update_to
    bar.update_to = lambda n: (update_to(n), shown.append(bar.done))
    asked = []
    watch_progress(bar, finished, reported, stop, interval=0, on_progress=lambda p: asked.append(p) or p >= 3400)
    assert shown == [1200, 3400, 3400, 5000, 5800]
    assert asked == [1200, 3400]  # called after each move until it says it is done (the re-plan is printed once)


def test_the_replan_line_gives_the_rest_at_the_measured_wall_rate():
    from overinterp.pipeline.select_stage import _replan_line

    assert _replan_line("[bgsis-k32 m/train]", 2_000, 1_000, 5.0, 100_000) == ("[bgsis-k32 m/train] measured: 2% of the passes done, 200 passes/s "
                                                              "over the last 5 s; at that rate the rest takes ≈ 8 min 10 s")


def test_the_driver_sees_passes_before_the_batch_ends_and_none_twice(ray_session, tmp_path, monkeypatch):
    """A real PassCounter actor: while the worker's batch runs, the counter already holds some of its
    passes, growing; once the batch returns it holds them all, once."""
    from dataclasses import asdict

    import numpy as np
    import ray

    import overinterp.pipeline.select_stage as ss
    from overinterp.pipeline.pass_counter import run_pass_counter
    from overinterp.selection import EngineConfig, planned_forward_passes

    monkeypatch.setattr(ss, "FORWARD_EVERY", 0.0)  # report every chunk: deterministic
    counter = run_pass_counter()
    job = _job()
    worker = ss.SelectionWorker([job], str(tmp_path), (0.5,), (0.25,), asdict(EngineConfig(chunk=16)), threads=1, counter=counter,
                                pass_id="this-pass")
    model, seen = worker.model(job["source"]), []

    def watched(x):  # the driver's view, read from inside the batch at every forward pass
        seen.append(ray.get(counter.total.remote("this-pass")))
        return model(x)

    worker.models["m"] = watched
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    worker({"image_id": np.arange(2), "label": np.zeros(2, np.int64), "image": images})
    total = planned_forward_passes("backselect", 64, 4, batch=2)
    assert any(0 < s < total for s in seen) and seen == sorted(seen)  # intermediate counts, growing
    assert ray.get(counter.total.remote("this-pass")) == total  # every pass of the batch, once
    counter.forget.remote("this-pass")


def test_a_selection_pass_shows_every_planned_pass_once(ray_session, tmp_path, monkeypatch, capsys):
    """Through Ray Data: the bar ends at the planned passes, and no count it was asked to show (the
    larger of the finished batches' and the workers' reports) ever exceeded them: nothing counted twice.
    The progress thread polls every 0.05 s here, so a count it read before the last batch arrived may
    reach the bar after the total (the bar never moves back)."""
    import numpy as np

    import overinterp.pipeline.select_stage as ss
    from overinterp import store
    from overinterp.pipeline.plan import SelectionJob, SelectionSource
    from overinterp.pipeline.resources import ResourcePlan
    from overinterp.selection import EngineConfig, params_json, planned_forward_passes, selector_params
    from overinterp.progress import Progress

    asked, bars = [], []

    class Recording(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update_to(self, n):
            asked.append(n)
            super().update_to(n)

    monkeypatch.setattr(ss, "Progress", Recording)
    monkeypatch.setattr(ss, "POLL_EVERY", 0.05)
    source = SelectionSource(tag="m", model={"name": "digits_cnn", "num_classes": 10, "in_channels": 1})
    job = SelectionJob(source, "backselect", params_json(selector_params("backselect", 4)), "test")
    resources = ResourcePlan(use_gpu=False, select_workers=1, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=1,
                             cpus_per_trial=1, gpus_per_trial=0, capacity="test")
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    n = ss.select_in_memory([job], {"test": images}, {"test": np.zeros(3, np.int64)}, (0.5,), (0.25,), str(tmp_path), resources,
                            EngineConfig(chunk=16), select_batch=1)
    total = 3 * planned_forward_passes("backselect", 64, 4)
    assert n == [3] and store.done_ids(str(tmp_path), "m", "backselect-k4", "test").tolist() == [0, 1, 2]
    assert max(asked) == total and len(bars) == 1 and bars[0].done == total
    assert any(0 < a < total for a in asked)  # the bar moved while the pass ran, not only at its end
    printed = capsys.readouterr().out
    assert "[backselect-k4 m/test] selected 3 images in " in printed  # wall time beside the passes


def test_a_streamed_selection_stores_the_good_images_and_lists_the_bad_ones(ray_session, tmp_path, damaged_folder):
    """A folder with a truncated JPEG and a text file named .jpg, through Ray Data and the actors:
    the driver counts the stored images from the calls' summary rows and lists the two bad files."""
    import overinterp.pipeline.select_stage as ss
    from overinterp import store
    from overinterp.pipeline.images import read_images
    from overinterp.pipeline.plan import SelectionJob, SelectionSource
    from overinterp.pipeline.resources import ResourcePlan
    from overinterp.selection import params_json, selector_params

    source = SelectionSource(tag="m", model={"name": "digits_cnn", "num_classes": 3, "in_channels": 3})
    job = SelectionJob(source, "gradient", params_json(selector_params("gradient")), "train")
    resources = ResourcePlan(use_gpu=False, select_workers=1, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=1,
                             cpus_per_trial=1, gpus_per_trial=0, capacity="test")
    root = str(tmp_path / "selections")
    n, (skipped,) = ss.select_stream([job], lambda done: read_images(damaged_folder, 8, skip_ids=done[0]), root, (0.5,) * 3, (0.25,) * 3,
                                     resources, select_batch=4, totals=[13])
    assert n == [11] and len(store.done_ids(root, "m", "gradient", "train")) == 11
    assert [p for p, _ in skipped] == ["n00000000/00000.jpg", "n00000001/notes.jpg"] and "truncated" in skipped[0][1]


def test_the_streamed_random_baseline_is_written_shard_by_shard_and_resumes(tmp_path):
    """One random shard per shard of the explained selection (the driver holds one shard's ids at a
    time), for exactly its images; a rerun writes nothing."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from overinterp import store
    from overinterp.pipeline.select_stage import stored_random_ids
    from overinterp.pipeline.stream import StreamBackend

    root = str(tmp_path / "selections")
    for ids in ([9, 3, 5], [20, 11]):  # two shards of the model's selection
        store.write_rows(root, model="m", selector="sel", selector_params="{}", split="train", image_id=np.array(ids),
                         label=np.array(ids) % 3, height=2, width=2, order=torch.arange(4).repeat(len(ids), 1))
    backend = SimpleNamespace(plan=SimpleNamespace(root=root, primary="sel", random_params={"seed": 0}), explained=SimpleNamespace(tag="m"),
                              cfg=SimpleNamespace(image_size=2))
    StreamBackend.write_random(backend, "train")
    assert stored_random_ids(root, "train", {"seed": 0}).tolist() == [3, 5, 9, 11, 20]
    from overinterp.selection import RANDOM, selector_tag

    _, shards = store.shard_files(root, "none", selector_tag(RANDOM, {"seed": 0}), "train")
    assert len(shards) == 2
    StreamBackend.write_random(backend, "train")  # a rerun: everything stored already
    assert len(store.shard_files(root, "none", selector_tag(RANDOM, {"seed": 0}), "train")[1]) == 2


def test_rows_a_lost_pass_wrote_late_are_stored_once_after_the_retry(tmp_path, monkeypatch, capsys):
    """A selection that needed a second pass ends with one row per image, even where an actor of the
    lost pass stored an image after the second pass had read the stored ids (a straggler)."""
    from overinterp import store
    from overinterp.pipeline import select_stage
    from overinterp.pipeline.plan import SelectionJob, SelectionSource

    root = str(tmp_path / "selections")
    job = SelectionJob(SelectionSource(tag="m", model={}), "backselect", "{}", "train")

    def write(ids):
        _write_ids(root, job.tag, ids)

    passes = []

    def fake_pass(jobs, ds, root, mean, std, resources, engine, select_batch, totals, done, hw, eager):
        passes.append(done[0].tolist())
        if len(passes) == 1:
            write([0, 1])
            raise ray.exceptions.ActorDiedError()
        write([2, 3])  # this pass selects the images it found missing
        write([2])  # the lost pass's straggler, too late for the stored ids this pass read
        return [2], [[]]

    monkeypatch.setattr(select_stage, "_select_pass", fake_pass)
    n, _ = select_stage.select_stream([job], lambda done: object(), root, None, None, None, totals=[4])
    assert passes == [[], [0, 1]] and n == [2]
    ids = store.read_selections(root, "m", job.tag, "train").image_id
    fsys, paths = store.shard_files(root, "m", job.tag, "train")
    rows = sum(store.read_shard(fsys, p, ["image_id"]).num_rows for p in paths)
    assert sorted(ids.tolist()) == [0, 1, 2, 3] and rows == 4  # the repeat is gone from the shards, not only from reads
    assert "after the lost worker: " in capsys.readouterr().out


def _write_ids(root: str, tag: str, ids) -> None:
    """What a worker stores for these images (the same order every time: BS is deterministic)."""
    import numpy as np
    import torch

    from overinterp import store

    store.write_rows(root, model="m", selector=tag, selector_params="{}", split="train", image_id=np.array(ids),
                     label=np.zeros(len(ids)), height=2, width=2, order=torch.arange(4).repeat(len(ids), 1))


@pytest.mark.parametrize("progress, passes_run", [(True, 6), (False, 3)])
def test_selection_gives_up_only_after_three_lost_passes_in_a_row_that_store_nothing(tmp_path, monkeypatch, capsys, progress, passes_run):
    """Five lost passes that each store an image, then one that finishes: the selection ends (a
    long selection loses nodes now and then). Lost passes that store nothing: the third one raises."""
    from overinterp.pipeline import select_stage
    from overinterp.pipeline.plan import SelectionJob, SelectionSource

    root = str(tmp_path / "selections")
    job = SelectionJob(SelectionSource(tag="m", model={}), "backselect", "{}", "train")
    passes = []

    def fake_pass(jobs, ds, root, mean, std, resources, engine, select_batch, totals, done, hw, eager):
        passes.append(len(done[0]))
        if len(passes) <= 5:
            if progress:
                _write_ids(root, job.tag, [len(passes) - 1])
            raise ray.exceptions.ActorDiedError()
        _write_ids(root, job.tag, [5])
        return [1], [[]]

    monkeypatch.setattr(select_stage, "_select_pass", fake_pass)
    if progress:
        n, _ = select_stage.select_stream([job], lambda done: object(), root, None, None, None, totals=[6])
        assert n == [1] and passes == [0, 1, 2, 3, 4, 5]
    else:
        with pytest.raises(ray.exceptions.ActorDiedError):
            select_stage.select_stream([job], lambda done: object(), root, None, None, None, totals=[6])
        assert passes == [0, 0, 0]
    assert len(passes) == passes_run
    lost = [ln for ln in capsys.readouterr().out.splitlines() if "a selection worker was lost" in ln]
    attempts = [ln.split("(attempt ")[1].split(";")[0] for ln in lost]
    assert attempts == (["2 of 3"] * 5 if progress else ["2 of 3", "3 of 3"])


@pytest.mark.parametrize("use_gpu", [True, False])
def test_both_backends_select_with_the_runs_compile_and_autocast(monkeypatch, use_gpu):
    """--compile and --autocast reach the selection of an in-memory and of a streamed run alike
    (autocast where the run has GPUs: it is not exact, and CPUs run fp32)."""
    from types import SimpleNamespace

    from overinterp.pipeline import memory, stream
    from overinterp.pipeline.memory import InMemoryBackend
    from overinterp.pipeline.stream import StreamBackend
    from overinterp.selection import EngineConfig

    engines = []
    monkeypatch.setattr(memory, "select_in_memory", lambda *args: engines.append(args[7]))
    monkeypatch.setattr(stream, "select_stream", lambda *args, **kwargs: engines.append(args[6]) or (None, []))
    cfg = SimpleNamespace(compile=True, autocast="bf16", selection_batch=lambda streamed: 8)
    resources = SimpleNamespace(use_gpu=use_gpu)
    InMemoryBackend.select(SimpleNamespace(cfg=cfg, resources=resources, plan=SimpleNamespace(root="r"),
                                           data=SimpleNamespace(images=None, labels=None, mean=None, std=None)), [])
    StreamBackend.select(SimpleNamespace(cfg=cfg, resources=resources, skipped={}, plan=SimpleNamespace(root="r", n_images={}, shape=(3, 8, 8)),
                                         data=SimpleNamespace(limits={})), [])
    assert engines == [EngineConfig(compile=True, autocast="bf16" if use_gpu else None)] * 2
