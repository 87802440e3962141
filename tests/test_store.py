"""The Parquet store (overinterp/store/): compact schema, content-named (idempotent) shards, overlap, raw rows, old versions, check/repair."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from overinterp import store
from overinterp.selection import keep_mask, random_order
from overinterp.store.check import check_store, repair_store


def _write(root, ids, split="test", curve=True, model="m-s0", selector="backselect", shift=0, conf=0.9):
    n = len(ids)
    order = torch.stack([torch.roll(torch.arange(4), int(i) + shift) for i in ids])
    return store.write_rows(
        root, model=model, selector=selector, selector_params=json.dumps({"k": 1}), split=split,
        image_id=np.array(ids), label=np.array(ids) % 3, pred=np.array(ids) % 2, confidence=np.full(n, conf),
        order=order, curve=torch.linspace(0.9, 0.1, 4).expand(n, 4) if curve else None, height=2, width=2,
    )


def test_roundtrip_sorted_by_id(tmp_path):
    root = str(tmp_path)
    _write(root, [2, 3])
    _write(root, [0, 1])
    sel = store.read_selections(root, "m-s0", "backselect", "test", expect_n=4)
    assert sel.image_id.tolist() == [0, 1, 2, 3]
    assert sel.label.tolist() == [0, 1, 2, 0]
    assert sel.order[1].tolist() == torch.roll(torch.arange(4), 1).tolist()
    assert torch.allclose(sel.curve, torch.linspace(0.9, 0.1, 4).expand(4, 4))
    assert sel.height == 2 and sel.width == 2
    assert store.done_ids(root, "m-s0", "backselect", "test").tolist() == [0, 1, 2, 3]
    assert keep_mask(sel.order, 0.5).sum(1).tolist() == [2, 2, 2, 2]  # masks for any fraction


def test_steps_roundtrip_exactly_with_several_pixels_per_step(tmp_path):
    # 6 pixels in steps of 4 and 2; within a step ascending pixel id (the selectors' canonical order)
    order = torch.tensor([[1, 2, 4, 5, 0, 3], [0, 1, 2, 3, 4, 5]])
    curve = torch.tensor([[0.8] * 4 + [0.3] * 2, [0.7] * 4 + [0.6] * 2])
    store.write_rows(str(tmp_path), model="m", selector="bgsis-k4", selector_params="{}", split="train", image_id=np.array([7, 3]),
                     label=np.array([1, 0]), order=order, step_sizes=(4, 2), curve=curve, height=2, width=3, forward_passes=np.array([4, 4]))
    sel = store.read_selections(str(tmp_path), "m", "bgsis-k4", "train")
    assert sel.image_id.tolist() == [3, 7]
    assert sel.order.tolist() == [order[1].tolist(), order[0].tolist()]
    assert torch.equal(sel.curve, curve[[1, 0]]) and sel.forward_passes.tolist() == [4, 4]
    t = pq.read_table(next(tmp_path.rglob("part-*.parquet")))
    assert t.column("curve").to_pylist()[0] == pytest.approx([0.8, 0.3])  # one value per step, not per pixel
    assert t.column("removal_step").to_pylist()[0] == [1, 0, 0, 1, 0, 0]


def test_non_canonical_order_within_a_step_is_refused(tmp_path):
    with pytest.raises(store.StoreError, match="ascending pixel id"):
        store.write_rows(str(tmp_path), model="m", selector="x", selector_params="{}", split="test", image_id=np.array([0]),
                         label=np.array([0]), order=torch.tensor([[2, 1, 0, 3]]), step_sizes=(2, 2), height=2, width=2)


def test_299px_bgsis_row_fits_200kb(tmp_path):
    hw, k, n = 299 * 299, 100, 8
    rng = np.random.default_rng(0)
    steps = [np.argsort(rng.random(hw)) for _ in range(n)]
    order = torch.from_numpy(np.stack([np.concatenate([np.sort(p[s : s + k]) for s in range(0, hw, k)]) for p in steps]))
    sizes = tuple(min(k, hw - s) for s in range(0, hw, k))
    curve = torch.from_numpy(np.repeat(rng.random((n, len(sizes))).astype(np.float32), sizes, axis=1))
    path = store.write_rows(str(tmp_path), model="tv_inception_v3", selector="bgsis-k100", selector_params="{}", split="train",
                            image_id=np.arange(n), label=np.zeros(n), order=order, step_sizes=sizes, curve=curve, height=299, width=299)
    assert os.path.getsize(path) / n <= 200_000
    sel = store.read_selections(str(tmp_path), "tv_inception_v3", "bgsis-k100", "train")
    assert torch.equal(sel.order, order) and torch.equal(sel.curve, curve)


def test_shards_are_named_by_content_so_a_retry_overwrites(tmp_path):
    a = _write(str(tmp_path), [0, 1])
    b = _write(str(tmp_path), [1, 0])  # a retried task: same ids, same rows
    assert a == b and len(list(tmp_path.rglob("*.parquet"))) == 1
    assert not [f for f in os.listdir(os.path.dirname(a)) if f.startswith(".tmp")]  # no temp files left
    schema = pq.read_schema(a)
    assert schema.metadata[b"overinterp_schema_version"] == b"2" and schema.names == store.SCHEMA.names


def test_identical_overlap_is_kept_once_with_one_warning(tmp_path, caplog):
    root = str(tmp_path)
    _write(root, [0, 1, 2])
    _write(root, [2, 3])  # an older store's retry under another batching: image 2 twice, same row
    with caplog.at_level(logging.WARNING, logger="overinterp.store"):
        sel = store.read_selections(root, "m-s0", "backselect", "test", expect_n=4)
        store.read_selections(root, "m-s0", "backselect", "test")
    assert sel.image_id.tolist() == [0, 1, 2, 3]
    warnings = [r for r in caplog.records if "repeated rows" in r.message]
    assert len(warnings) == 1 and "overinterp store repair" in warnings[0].message


def test_raw_image_ids_see_a_repeated_shard_that_reads_hide(tmp_path):
    root = str(tmp_path)
    _write(root, [0, 1, 2])
    planted = tmp_path / "m-s0" / "backselect" / "test" / "part-0000000000000000.parquet"
    pq.write_table(pq.read_table(_write(root, [2, 3])), planted)  # the same rows again, under another name
    assert sorted(store.raw_image_ids(root, "m-s0", "backselect", "test").tolist()) == [0, 1, 2, 2, 2, 3, 3]
    assert store.read_selections(root, "m-s0", "backselect", "test").image_id.tolist() == [0, 1, 2, 3]  # kept once
    assert store.done_ids(root, "m-s0", "backselect", "test").tolist() == [0, 1, 2, 3]
    empty = store.raw_image_ids(root, "m-s0", "backselect", "train")  # nothing stored
    assert empty.dtype == np.int64 and len(empty) == 0


@pytest.mark.parametrize("n_done", [0, 1, 7, 500])
def test_stored_mask_agrees_with_isin_on_done_ids(tmp_path, n_done):
    """done_ids is a sorted int64 array (no Python set); stored_mask's binary search answers membership like np.isin."""
    rng = np.random.default_rng(n_done)
    ids = rng.choice(2**62, 600, replace=False)
    done = ids[:n_done]
    for part in np.array_split(done, 3):  # three shards, written out of order
        if len(part):
            store.write_rows(str(tmp_path), model="none", selector="random-seed0", selector_params="{}", split="train",
                             image_id=part[::-1], label=np.zeros(len(part)), height=2, width=2)
    stored = store.done_ids(str(tmp_path), "none", "random-seed0", "train")
    assert stored.dtype == np.int64 and stored.tolist() == sorted(done.tolist())
    probe = np.concatenate([rng.permutation(ids), [-1, 2**63 - 1]])
    assert np.array_equal(store.stored_mask(probe, stored), np.isin(probe, done))


def test_conflicting_overlap_names_both_files_and_the_fix(tmp_path):
    root = str(tmp_path)
    a = _write(root, [0, 1])
    b = _write(root, [1, 2], shift=1)  # image 1 with another order
    with pytest.raises(store.StoreError) as e:
        store.read_selections(root, "m-s0", "backselect", "test")
    assert a in str(e.value) and b in str(e.value) and "overinterp store repair --out" in str(e.value)


def test_gaps_are_errors(tmp_path):
    _write(str(tmp_path), [0, 2])
    with pytest.raises(store.StoreError, match="holds 2 of 3 images"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test", expect_n=3)


def test_only_the_asked_ids_are_read(tmp_path):
    _write(str(tmp_path), [0, 1])
    _write(str(tmp_path), [2, 3, 4])  # a second shard
    full = store.read_selections(str(tmp_path), "m-s0", "backselect", "test")
    some = store.read_selections(str(tmp_path), "m-s0", "backselect", "test", only_ids=np.array([4, 1]))
    assert some.image_id.tolist() == [1, 4] and torch.equal(some.order, full.order[[1, 4]])
    with pytest.raises(store.StoreError, match="holds 1 of 2 images"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test", only_ids=np.array([4, 7]))


def test_random_rows_store_no_order_and_regenerate_it(tmp_path):
    ids = np.array([5, 9])
    store.write_rows(str(tmp_path), model="none", selector="random-seed3", selector_params=json.dumps({"seed": 3}), split="train",
                     image_id=ids, label=np.array([0, 1]), height=4, width=4)
    sel = store.read_selections(str(tmp_path), "none", "random-seed3", "train")
    assert sel.curve is None and torch.equal(sel.order, random_order(ids, 16, 3, "train"))
    with pytest.raises(store.StoreError, match="no p\\(c\\) curve"):
        sel.sis_mask(0.5)


def test_version_1_shards_are_read(tmp_path):
    v1 = store.V1_SCHEMA.with_metadata({"overinterp_schema_version": "1"})
    d = tmp_path / "m-s0" / "backselect" / "test"
    d.mkdir(parents=True)
    rows = {"image_id": [0], "split": ["test"], "label": [1], "pred": [1], "confidence": [0.9], "height": [2], "width": [2],
            "model": ["m-s0"], "selector": ["backselect"], "selector_params": ["{}"], "order": [[3, 0, 2, 1]], "curve": [[0.9, 0.8, 0.7, 0.6]]}
    pq.write_table(pa.table(rows, schema=v1), d / "part-000000000-1-abcd1234.parquet")
    sel = store.read_selections(str(tmp_path), "m-s0", "backselect", "test")
    assert sel.order.tolist() == [[3, 0, 2, 1]] and sel.curve[0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_other_schema_version_is_refused_with_the_fix(tmp_path):
    path = _write(str(tmp_path), [0])
    t = pq.read_table(path)
    pq.write_table(t.replace_schema_metadata({"overinterp_schema_version": "9"}), path)
    with pytest.raises(store.StoreError, match="schema version 9.*overinterp store repair"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test")


def test_other_columns_are_refused_before_reading(tmp_path):
    path = _write(str(tmp_path), [0])
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("removal_step"), "removal_step", pa.array(["x"], pa.string()))
    pq.write_table(t.replace_schema_metadata(store.SCHEMA.metadata), path)
    with pytest.raises(store.StoreError, match=r"carries the store's version but not its columns \(differs in \['removal_step'\]\)"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "test")


def test_corrupt_shard_is_named(tmp_path):
    path = _write(str(tmp_path), [0])
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(store.StoreError) as e:
        store.done_ids(str(tmp_path), "m-s0", "backselect", "test")
    assert path in str(e.value) and "overinterp store repair" in str(e.value)


def test_missing_selection_names_the_fix(tmp_path):
    with pytest.raises(store.StoreError, match="no selections stored"):
        store.read_selections(str(tmp_path), "m-s0", "backselect", "train")
    assert store.done_ids(str(tmp_path), "m-s0", "backselect", "train").tolist() == []


def test_wrong_order_shape_is_refused(tmp_path):
    with pytest.raises(store.StoreError, match="order has shape"):
        store.write_rows(str(tmp_path), model="m", selector="backselect", selector_params="{}", split="test",
                         image_id=np.array([0]), label=np.array([0]), order=torch.zeros(1, 3, dtype=torch.long), height=2, width=2)


def test_masks_from_stored_rows_at_any_fraction_and_tau(tmp_path):
    _write(str(tmp_path), [0, 1])
    sel = store.read_selections(str(tmp_path), "m-s0", "backselect", "test")
    assert sel.keep_mask(0.25).sum(1).tolist() == [1, 1] and sel.keep_mask(1.0).all()
    # curve (0.9, 0.63, 0.37, 0.1) after each removal, confidence 0.9: at tau 0.5 the last two pixels are needed
    assert sel.sis_mask(0.5).sum(1).tolist() == [2, 2] and not sel.sis_mask(0.95).any()


def test_steps_to_keep_matches_keep_mask():
    rng = np.random.default_rng(1)
    steps = np.stack([rng.permutation(10) for _ in range(3)]).astype(np.uint32)
    assert np.array_equal(store.steps_to_keep(steps, 0.3), keep_mask(torch.from_numpy(store.decode_order(steps)), 0.3).numpy())


def test_uri_roots_go_through_pyarrow_filesystems(tmp_path):
    root = f"file://{tmp_path}/store"  # the code path s3:// takes, on a local file system
    _write(root, [0, 1])
    assert store.done_ids(root, "m-s0", "backselect", "test").tolist() == [0, 1]
    assert (tmp_path / "store" / "m-s0" / "backselect" / "test").is_dir()


# --- check / repair ----------------------------------------------------------------------------


def _all_rows(out):
    return sum(pq.read_metadata(p).num_rows for p in out.rglob("part-*.parquet") if p.stat().st_size > 100)


def test_check_and_repair(tmp_path):
    out = tmp_path / "out"
    root = str(out / "selections")
    _write(root, [0, 1, 2])
    _write(root, [2, 3])  # identical repeat of image 2
    _write(root, [0, 1, 2, 3], model="none", selector="random-seed0", curve=False)
    _write(root, [0, 1], model="m-ens2")  # lacks 2 and 3
    bad = _write(root, [5], model="m-ens2")
    with open(bad, "wb") as f:
        f.write(b"not parquet")
    rows_before = _all_rows(out)
    reports = {(r.model, r.selector, r.split): r for r in check_store(str(out))}
    r = reports[("m-s0", "backselect", "test")]
    assert (r.rows, r.files, r.repeated, r.conflicting, r.missing) == (4, 2, 1, 0, [])
    e = reports[("m-ens2", "backselect", "test")]
    assert e.missing == [2, 3] and len(e.unreadable) == 1 and not e.ok
    assert reports[("none", "random-seed0", "test")].ok

    actions = repair_store(str(out))
    assert any("quarantined" in a and bad in a for a in actions)
    assert (out / "quarantine" / "m-ens2" / "backselect" / "test" / os.path.basename(bad)).exists()  # moved, not deleted
    after = {(r.model, r.selector, r.split): r for r in check_store(str(out))}
    assert after[("m-s0", "backselect", "test")].ok and after[("m-s0", "backselect", "test")].rows == 4
    assert not after[("m-ens2", "backselect", "test")].unreadable
    quarantined = sum(pq.read_metadata(p).num_rows for p in (out / "quarantine").rglob("*.parquet") if p.stat().st_size > 100)
    # every row is still somewhere: in the store but the repeated one, or in quarantine (the corrupt file held none)
    assert quarantined > 0 and _all_rows(out) - quarantined == rows_before - 1
    assert store.read_selections(root, "m-s0", "backselect", "test", expect_n=4).image_id.tolist() == [0, 1, 2, 3]


def test_repair_keeps_the_newest_of_conflicting_rows(tmp_path):
    out = tmp_path / "out"
    root = str(out / "selections")
    old = _write(root, [0, 1])
    os.utime(old, (1, 1))  # written long ago
    _write(root, [1, 2], shift=1)
    repair_store(str(out))
    sel = store.read_selections(root, "m-s0", "backselect", "test", expect_n=3)
    assert sel.order[1].tolist() == torch.roll(torch.arange(4), 2).tolist()  # image 1 from the newer shard
    assert any((out / "quarantine").rglob(os.path.basename(old)))


def test_a_writer_killed_mid_shard_leaves_nothing_a_reader_sees_and_the_rewrite_is_whole(tmp_path):
    """SIGKILL while a shard's bytes are being written (its temporary file exists): readers list no
    shard, `store check` finds nothing unreadable, and writing the batch again gives a whole shard."""
    import signal
    import subprocess
    import sys
    import time

    root = str(tmp_path / "selections")
    code = ("import numpy as np, torch\nfrom overinterp import store\nn = 64 * 4_700\n"  # ~20 MB of shard: a write of a second or so
            "order = torch.stack([torch.randperm(64) for _ in range(64)]).repeat(n // 64, 1)\n"
            f"store.write_rows({root!r}, model='m', selector='sel', selector_params='{{}}', split='train', image_id=np.arange(n),"
            " label=np.zeros(n), height=8, width=8, order=order)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = os.path.join(root, "m", "sel", "train")
    t0 = time.time()
    while writer.poll() is None and time.time() - t0 < 120:
        if os.path.isdir(d) and any(f.startswith(".tmp-") and os.path.getsize(os.path.join(d, f)) > 0 for f in os.listdir(d)):
            break
        time.sleep(0.002)
    assert writer.poll() is None, "the shard was written whole before the kill: nothing was tested"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert [f for f in os.listdir(d) if f.startswith(".tmp-")]  # killed mid-write: the partial bytes are there...
    assert store.shard_files(root, "m", "sel", "train")[1] == []  # ...and no reader sees them
    assert all(not r.unreadable for r in check_store(str(tmp_path)))
    store.write_rows(root, model="m", selector="sel", selector_params="{}", split="train", image_id=np.arange(3), label=np.zeros(3),
                     height=2, width=2, order=torch.arange(4).repeat(3, 1))
    assert store.done_ids(root, "m", "sel", "train").tolist() == [0, 1, 2]
