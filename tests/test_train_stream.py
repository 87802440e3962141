"""Streamed training's inputs: every image joined by image_id with its own keep-mask from the store,
and repeated ids refused."""

import numpy as np
import pytest
import torch

from overinterp import store
from overinterp.pipeline import train_stream
from overinterp.pipeline.images import MASK_COLUMN, read_encoded
from overinterp.pipeline.train_stream import subset_stream, unpack_keep
from overinterp.synthetic import write_encoded_parquet, write_imagefolder

pytestmark = pytest.mark.ray

SIZE, FRACTION = 8, 0.2  # 64 pixels, 13 kept


@pytest.mark.parametrize("mask_bytes, driver_bytes", [(1 << 30, 1 << 22), (1 << 30, 0), (0, 0)],
                         ids=["broadcast-from-driver", "broadcast-from-task", "hash-join"])
def test_the_joined_keep_of_each_image_is_its_stored_mask(ray_session, tmp_path, monkeypatch, mask_bytes, driver_bytes):
    """Both joins (the masks looked up in the object store, its table read in the driver or by a task,
    and Ray Data's hash join for masks too big to broadcast) give each stored image its own mask and
    leave out images without a selection."""
    monkeypatch.setattr(train_stream, "BROADCAST_MASK_BYTES", mask_bytes)
    monkeypatch.setattr(train_stream, "DRIVER_MASK_TABLE_BYTES", driver_bytes)
    built_in_driver = []
    monkeypatch.setattr(train_stream, "mask_table", lambda *a, real=train_stream.mask_table: (built_in_driver.append(a), real(*a))[1])
    source = str(tmp_path / "train.parquet")
    write_encoded_parquet(source, n=10, num_classes=3, size=SIZE, seed=0)
    encoded = read_encoded(source).take_all()
    ids = np.array(sorted(r["image_id"] for r in encoded), dtype=np.int64)
    stored = ids[[0, 2, 3, 5, 7, 8, 9]]  # three images have no selection: the inner join leaves them out
    hw = SIZE * SIZE
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(hw) for _ in stored])  # (7, 64) a different order per image
    sizes = (4,) * (hw // 4)  # 4 pixels a step: ties broken by pixel id inside a step
    order = np.stack([np.concatenate([np.sort(o[i:i + 4]) for i in range(0, hw, 4)]) for o in order])
    root = str(tmp_path / "selections")
    for rows in (slice(0, 3), slice(3, 7)):  # two shards
        store.write_rows(root, model="m", selector="sel", selector_params="{}", split="train", image_id=stored[rows],
                         label=np.zeros(len(stored[rows])), height=SIZE, width=SIZE, order=torch.from_numpy(order[rows]),
                         step_sizes=sizes)
    expected = dict(zip(stored.tolist(), store.steps_to_keep(store.encode_steps(order, sizes), FRACTION)))

    joined = subset_stream(source, None, None, SIZE, root, "m/sel", "train", FRACTION, n_images=10).take_all()
    assert sorted(r["image_id"] for r in joined) == sorted(expected)
    labels = {r["image_id"]: r["label"] for r in encoded}
    for r in joined:
        keep = unpack_keep(torch.from_numpy(np.array(r[MASK_COLUMN])[None]), hw)[0].numpy()
        assert np.array_equal(keep, expected[r["image_id"]]), r["image_id"]
        assert keep.sum() == 13 and r["label"] == labels[r["image_id"]]
    if mask_bytes:  # a stage reads each selection's masks from the store once, for all its trials
        assert len(built_in_driver) == (1 if driver_bytes else 0)  # the task's mask_table is the worker's own import
        table = train_stream.mask_table_refs(root, [("m/sel", "train")], hw, FRACTION, {"train": 10})[("m/sel", "train")]
        calls = []
        monkeypatch.setattr(train_stream, "mask_table_refs", lambda *a: calls.append(a))
        for _ in range(2):
            again = subset_stream(source, None, None, SIZE, root, "m/sel", "train", FRACTION, n_images=10, table=table).take_all()
            assert sorted(r["image_id"] for r in again) == sorted(expected)
        assert calls == []  # given the table, no trial builds it again


def test_a_selection_without_images_is_refused(ray_session, tmp_path):
    root = str(tmp_path / "selections")
    with pytest.raises(store.StoreError, match="no selections stored for m/sel train"):
        train_stream.mask_table(root, "m/sel", "train", 4, 0.5)


def test_repeated_stored_ids_are_refused_with_the_repair_command(ray_session, tmp_path, monkeypatch):
    root = str(tmp_path / "selections")
    store.write_rows(root, model="m", selector="sel", selector_params="{}", split="train", image_id=np.array([7, 7]), label=np.zeros(2),
                     height=2, width=2, order=torch.arange(4).repeat(2, 1))  # the same image stored twice
    with pytest.raises(store.StoreError, match="repeated image ids: run `overinterp store repair"):
        train_stream.mask_table(root, "m/sel", "train", 4, 0.5)
    for driver_bytes in (1 << 22, 0):  # the table read in the driver, and by a task: raised in the driver, before any trial
        monkeypatch.setattr(train_stream, "DRIVER_MASK_TABLE_BYTES", driver_bytes)
        with pytest.raises(store.StoreError, match="repeated image ids"):
            train_stream.mask_table_refs(root, [("m/sel", "train")], 4, 0.5, {"train": 2})


def test_a_training_stream_reads_its_files_in_a_new_seeded_order_each_epoch(ray_session, tmp_path):
    """A training stream's files come in a random order drawn from its seed, another each epoch, the
    same again in a new run; and no stage of it waits for the whole split (a block shuffle would:
    the first batch would come only once every image was decoded)."""
    classes = write_imagefolder(str(tmp_path), n_per_class=8, num_classes=3, size=SIZE)

    def stream(seed):
        return subset_stream(str(tmp_path / "train"), classes, None, SIZE, "", None, "train", FRACTION, n_images=24, shuffle_seed=seed)

    def epochs(seed, n=2):
        ds = stream(seed)
        return [[int(i) for b in ds.iter_batches(batch_size=None) for i in b["image_id"]] for _ in range(n)]

    first, second = epochs(0)
    assert len(first) == 24 and sorted(first) == sorted(second)  # every image once an epoch
    assert first != second  # another order each epoch
    assert epochs(0) == [first, second]  # the same orders run after run
    assert epochs(1)[0] != first
    assert not any(stage in str(stream(0)) for stage in ("RandomizeBlockOrder", "RandomShuffle", "Sort", "Repartition"))
    # rows in the files' order, whichever decoding task finishes first (too rare to catch by running here)
    assert stream(0).context.execution_options.preserve_order


def test_a_pilot_trains_on_its_first_images_in_a_new_seeded_order_each_epoch(ray_session, tmp_path):
    """With a limit (--max-images, a pilot) the stream holds the first images in listing order, every
    epoch, and puts their blocks in an order drawn from the seed, another each epoch."""
    classes = write_imagefolder(str(tmp_path), n_per_class=220, num_classes=3, size=SIZE)
    train = str(tmp_path / "train")

    def epochs(seed, n=2):
        ds = subset_stream(train, classes, 640, SIZE, "", None, "train", FRACTION, n_images=640, shuffle_seed=seed)
        return [[int(i) for b in ds.iter_batches(batch_size=None) for i in b["image_id"]] for _ in range(n)]

    listed = epochs(None, 1)[0]  # the first 640 in listing order: classes 0 and 1, then part of 2
    first, second = epochs(0)
    assert sorted(first) == sorted(second) == sorted(listed) and first != second != listed
    assert epochs(0) == [first, second]


def test_a_one_worker_trial_trains_alike_run_after_run(ray_session, tmp_path):
    """A streamed trial on a folder of many files (read in parallel, class by class on disk) gives the
    same losses and accuracy when run again with the same seed."""
    from overinterp.pipeline.resources import ResourcePlan
    from overinterp.pipeline.trial import TrialSpec

    classes = write_imagefolder(str(tmp_path / "data"), n_per_class=16, num_classes=3, size=SIZE)
    spec = TrialSpec(model="digits_cnn", seed=0, subset=None)
    res = ResourcePlan(use_gpu=False, select_workers=1, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=1, cpus_per_trial=1,
                       gpus_per_trial=0, capacity="test")
    info = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "hw": SIZE * SIZE, "num_classes": 3}
    train = {"epochs": 2, "batch_size": 8, "lr": 0.05, "augment": True}

    def trial(out):
        streams = {name: subset_stream(str(tmp_path / "data" / folder), classes, None, SIZE, "", None, split, FRACTION, n_images=48,
                                       shuffle_seed=spec.seed if name == "train" else None)
                   for name, folder, split in (("train", "train", "train"), ("val", "val", "test"))}
        return train_stream.run_stream_trial(spec, streams, train, info, str(tmp_path / out), res, use_cuda=False)

    first, again = trial("a"), trial("b")
    assert first["losses"] == again["losses"] and first["accuracy"] == again["accuracy"]


def test_a_one_worker_trial_goes_on_from_its_last_epoch_state(ray_session, tmp_path):
    """A one-worker trial trains in its own process and keeps its epoch state (model, optimiser,
    schedule, each epoch's metrics) in trials/<name>/state.pt: a trial whose process died after
    epoch 0 trains only epoch 1 when it runs again, reading its files in the order the uninterrupted
    trial read them (the same losses), and removes the state once finished."""
    import os

    from overinterp.pipeline.resources import ResourcePlan
    from overinterp.pipeline.trial import TrialSpec, trial_dir

    classes = write_imagefolder(str(tmp_path / "data"), n_per_class=4, num_classes=3, size=SIZE)

    def streams():
        return {name: subset_stream(str(tmp_path / "data" / folder), classes, None, SIZE, "", None, split, FRACTION, n_images=12,
                                    shuffle_seed=0 if name == "train" else None)
                for name, folder, split in (("train", "train", "train"), ("val", "val", "test"))}

    out = str(tmp_path / "out")
    spec = TrialSpec(model="digits_cnn", seed=0, subset=None)
    res = ResourcePlan(use_gpu=False, select_workers=1, cpus_per_worker=1, gpus_per_worker=0, trial_concurrency=1, cpus_per_trial=1,
                       gpus_per_trial=0, capacity="test")
    info = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "hw": SIZE * SIZE, "num_classes": 3}
    train = {"epochs": 2, "batch_size": 4, "lr": 0.05, "augment": False}
    whole = train_stream.run_stream_trial(spec, streams(), train, info, str(tmp_path / "whole"), res, use_cuda=False)
    assert whole["resumed_from_epochs"] == [] and len(whole["losses"]) == 2 and whole["workers"] == 1

    # the first epoch alone, as a trial killed after writing its epoch-0 state leaves it
    state = os.path.join(trial_dir(out, spec), "state.pt")
    config = {"trial": whole["spec"], "train": {**train, "epochs": 1}, "threads": 1, "fit_at": 0.0, "state_path": state, **info}
    first = train_stream.train_loop(config, streams())["history"]
    assert [m["epoch"] for m in first] == [0] and os.path.exists(state)
    resumed = train_stream.run_stream_trial(spec, streams(), train, info, out, res, use_cuda=False)
    assert resumed["resumed_from_epochs"] == [1]  # epoch 1 started from the state, epoch 0 was not trained again
    assert resumed["losses"][0] == first[0]["train_loss"] and len(resumed["losses"]) == 2
    # the same seeds and batches in the same order: the resumed trial ends where the uninterrupted one does
    assert resumed["losses"] == pytest.approx(whole["losses"]) and resumed["accuracy"] == whole["accuracy"]
    assert not os.path.exists(state) and os.path.exists(resumed["checkpoint"])


def test_a_streamed_batch_is_filled_per_image_id_as_in_memory():
    """Evaluation fills each image's removed pixels (ROAD) from its own id, as the in-memory
    evaluation does from its index: the same fill alone or in any batch; training draws the noise
    from the epoch's generator, the same again from the same seed."""
    from overinterp.pipeline.train_stream import model_inputs
    from overinterp.training import prepare

    g = torch.Generator().manual_seed(0)
    hw, mean, std = SIZE * SIZE, (0.5,) * 3, (0.25,) * 3
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    keep = torch.rand(4, hw, generator=g) < 0.3
    batch = {"image": images, "image_id": torch.tensor([7, 2, 5, 0]), MASK_COLUMN: torch.from_numpy(np.packbits(keep.numpy(), axis=1))}
    x = model_inputs(batch, mean, std, hw, "road")
    assert torch.equal(x, prepare(images, mean, std, keep, "road", seeds=[7, 2, 5, 0]))
    assert torch.equal(model_inputs({k: v[2:3] for k, v in batch.items()}, mean, std, hw, "road")[0], x[2])
    assert not torch.equal(x, prepare(images, mean, std, keep, "road", seeds=[0, 1, 2, 3]))  # the id, not the place in the batch
    a, b = (model_inputs(batch, mean, std, hw, "road", generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(model_inputs(batch, mean, std, hw, "mean"), prepare(images, mean, std, keep, "mean"))
