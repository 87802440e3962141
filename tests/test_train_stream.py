"""Streamed training's inputs: every image joined by image_id with its own keep-mask from the store,
and repeated ids refused."""

import numpy as np
import pytest
import torch

from overinterp import store
from overinterp.pipeline.images import read_encoded
from overinterp.pipeline import train_stream
from overinterp.pipeline.train_stream import MASK_COLUMN, subset_stream, unpack_keep
from overinterp.synthetic import write_encoded_parquet

pytestmark = pytest.mark.ray

SIZE, FRACTION = 8, 0.2  # 64 pixels, 13 kept


@pytest.mark.parametrize("mask_bytes", [1 << 30, 0], ids=["broadcast", "hash-join"])
def test_the_joined_keep_of_each_image_is_its_stored_mask(ray_session, tmp_path, monkeypatch, mask_bytes):
    """Both joins (the masks looked up in the object store, and Ray Data's hash join for masks too big
    to broadcast) give each stored image its own mask and leave out images without a selection."""
    monkeypatch.setattr(train_stream, "BROADCAST_MASK_BYTES", mask_bytes)
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
        table = train_stream.mask_table_ref(root, "m/sel", "train", hw, FRACTION)
        calls = []
        monkeypatch.setattr(train_stream, "mask_table_ref", lambda *a: calls.append(a))
        for _ in range(2):
            again = subset_stream(source, None, None, SIZE, root, "m/sel", "train", FRACTION, n_images=10, table=table).take_all()
            assert sorted(r["image_id"] for r in again) == sorted(expected)
        assert calls == []  # given the table, no trial builds it again


def test_a_selection_without_images_is_refused(ray_session, tmp_path):
    root = str(tmp_path / "selections")
    with pytest.raises(store.StoreError, match="no selections stored for m/sel train"):
        train_stream.mask_table(root, "m/sel", "train", 4, 0.5)


def test_repeated_stored_ids_are_refused_with_the_repair_command(ray_session, tmp_path):
    root = str(tmp_path / "selections")
    store.write_rows(root, model="m", selector="sel", selector_params="{}", split="train", image_id=np.array([7, 7]), label=np.zeros(2),
                     height=2, width=2, order=torch.arange(4).repeat(2, 1))  # the same image stored twice
    with pytest.raises(store.StoreError, match="repeated image ids: run `overinterp store repair"):
        train_stream.mask_table(root, "m/sel", "train", 4, 0.5)
    with pytest.raises(store.StoreError, match="repeated image ids"):  # the task that builds it: raised in the driver, before any trial
        train_stream.mask_table_ref(root, "m/sel", "train", 4, 0.5)
