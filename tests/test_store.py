"""The Parquet store: schema, atomic shards, resume, validation."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from overinterp import store
from overinterp.selection import keep_mask


def _write(root, ids, split="test", curve=True, model="m-s0", selector="backselect"):
    n = len(ids)
    order = torch.stack([torch.roll(torch.arange(4), int(i)) for i in ids])
    return store.write_rows(
        root, model=model, selector=selector, selector_params=json.dumps({"k": 1}), split=split,
        image_id=np.array(ids), label=np.array(ids) % 3, pred=np.array(ids) % 2, confidence=np.full(n, 0.9),
        order=order, curve=torch.full((n, 4), 0.5) if curve else None, height=2, width=2,
    )


def test_roundtrip_sorted_by_id(tmp_path):
    root = str(tmp_path)
    _write(root, [2, 3])
    _write(root, [0, 1])
    sel = store.read_selections(root, "m-s0", "backselect", "test", expect_n=4)
    assert sel.image_id.tolist() == [0, 1, 2, 3]
    assert sel.label.tolist() == [0, 1, 2, 0]
    assert sel.order[1].tolist() == torch.roll(torch.arange(4), 1).tolist()
    assert sel.curve.shape == (4, 4) and sel.height == 2 and sel.width == 2
    assert store.done_ids(root, "m-s0", "backselect", "test") == {0, 1, 2, 3}
    # masks rebuilt from the stored order for any fraction
    assert keep_mask(sel.order, 0.5).sum(1).tolist() == [2, 2, 2, 2]


def test_shard_carries_schema_and_version(tmp_path):
    path = _write(str(tmp_path), [0])
    schema = pq.read_schema(path)
    assert schema.metadata[b"overinterp_schema_version"] == store.SCHEMA_VERSION.encode()
    assert schema.names == store.SCHEMA.names
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]  # no temp files left


def test_model_free_rows_have_null_curve(tmp_path):
    _write(str(tmp_path), [0, 1], curve=False, model="none", selector="random-seed0")
    sel = store.read_selections(str(tmp_path), "none", "random-seed0", "test")
    assert sel.curve is None


def test_gaps_and_duplicates_are_errors(tmp_path):
    root = str(tmp_path)
    _write(root, [0, 2])
    with pytest.raises(store.StoreError, match="holds 2 of 3 images"):
        store.read_selections(root, "m-s0", "backselect", "test", expect_n=3)
    _write(root, [2])
    with pytest.raises(store.StoreError, match="duplicate"):
        store.read_selections(root, "m-s0", "backselect", "test")


def test_other_schema_version_is_refused(tmp_path):
    path = _write(str(tmp_path), [0])
    t = pq.read_table(path)
    pq.write_table(t.replace_schema_metadata({"overinterp_schema_version": "0"}), path)
    with pytest.raises(store.StoreError, match="schema version 0"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test")


def test_other_columns_are_refused_before_reading(tmp_path):
    path = _write(str(tmp_path), [0])
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("order"), "order", pa.array(["x"], pa.string()))
    pq.write_table(t.replace_schema_metadata(store.SCHEMA.metadata), path)
    with pytest.raises(store.StoreError, match=r"carries the store's version but not its columns \(differs in \['order'\]\)"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test")


def test_missing_selection_names_the_fix(tmp_path):
    with pytest.raises(store.StoreError, match="no selections stored"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "train")
    assert store.done_ids(str(tmp_path), "m-s0", "backselect", "train") == set()


def test_wrong_order_shape_is_refused(tmp_path):
    with pytest.raises(store.StoreError, match="order has shape"):
        store.write_rows(str(tmp_path), model="m", selector="backselect", selector_params="{}", split="test",
                         image_id=np.array([0]), label=np.array([0]), order=torch.zeros(1, 3, dtype=torch.long), height=2, width=2)


def test_masks_from_stored_rows_at_any_fraction_and_tau(tmp_path):
    _write(str(tmp_path), [0, 1])
    sel = store.read_selections(str(tmp_path), "m-s0", "backselect", "test")
    assert sel.keep_mask(0.25).sum(1).tolist() == [1, 1] and sel.keep_mask(1.0).all()
    # curve 0.5 everywhere, confidence 0.9: at tau 0.5 the last pixel alone suffices; at 0.95 there is no SIS
    assert sel.sis_mask(0.5).sum(1).tolist() == [1, 1] and not sel.sis_mask(0.95).any()
    _write(str(tmp_path), [0], curve=False, model="none", selector="random-seed0")
    with pytest.raises(store.StoreError, match="no p\\(c\\) curve"):
        store.read_selections(str(tmp_path), "none", "random-seed0", "test").sis_mask(0.5)


def test_uri_roots_go_through_pyarrow_filesystems(tmp_path):
    root = f"file://{tmp_path}/store"  # the code path s3:// takes, on a local file system
    _write(root, [0, 1])
    assert store.done_ids(root, "m-s0", "backselect", "test") == {0, 1}
    assert (tmp_path / "store" / "m-s0" / "backselect" / "test").is_dir()
