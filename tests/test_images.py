"""pipeline/images.py: the folder layout is checked before decoding; files that do not decode are
rows with a reason, which drop_bad leaves out (or fatal with strict). Real JPEG/PNG files."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overinterp.pipeline.images import SourceError, check_folder, drop_bad, list_classes, read_images
from overinterp.synthetic import write_encoded_parquet, write_imagefolder


def _decode(path: str, size: int) -> tuple[dict, list]:
    """(the good rows as arrays sorted by image id, (path, reason) of the bad rows sorted by path)."""
    ds = read_images(path, size).materialize()
    bad = sorted((r["path"], r["error"]) for r in ds.select_columns(["path", "error"]).take_all() if r["error"])
    good = [b for b in drop_bad(ds).iter_batches(batch_size=None, batch_format="numpy")]
    rows = {k: np.concatenate([b[k] for b in good]) for k in ("image_id", "label", "image")}
    order = np.argsort(rows["image_id"])
    return {k: v[order] for k, v in rows.items()}, bad


def test_check_folder_counts_images_per_class(damaged_folder):
    assert check_folder(damaged_folder, list_classes(damaged_folder)) == {"n00000000": 4, "n00000001": 5, "n00000002": 4}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: (t / "n00000009").mkdir(), r"train/n00000009 holds no images \(\.jpg, .*\): remove it, or add images"),
        (lambda t: (t / "stray.png").write_bytes(b""), r"train/stray\.png: image outside a class folder: move it into .*/train/<class>/"),
    ],
)
def test_check_folder_errors_name_the_folder(tmp_path, change, match):
    write_imagefolder(str(tmp_path), n_per_class=2, num_classes=2, size=40)
    change(tmp_path / "train")
    with pytest.raises(SourceError, match=match):
        check_folder(str(tmp_path / "train"), list_classes(str(tmp_path / "train")))


def test_check_folder_val_class_not_in_train(tmp_path):
    write_imagefolder(str(tmp_path), n_per_class=2, num_classes=2, size=40)
    (tmp_path / "val" / "extra").mkdir()
    with pytest.raises(SourceError, match=r"val/extra: class folder 'extra' is not among the train classes"):
        check_folder(str(tmp_path / "val"), ["n00000000", "n00000001"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty has no class sub-folders: expected .*/empty/<class>/<image>"):
        check_folder(str(tmp_path / "empty"), [])


def test_a_file_that_is_not_parquet_is_refused_as_a_file(tmp_path):
    (tmp_path / "labels.csv").write_text("a,0\n")
    with pytest.raises(SourceError, match=r"labels\.csv is a file, not a source: give an ImageFolder split .* or Parquet"):
        list_classes(str(tmp_path / "labels.csv"))
    (tmp_path / "split" / "cat").mkdir(parents=True)  # a folder holding one folder: its class, not the path itself
    with pytest.raises(SourceError, match=r"split has one class folder \(cat\): a classifier needs at least 2"):
        list_classes(str(tmp_path / "split"))
    (tmp_path / "split" / "dog").mkdir()
    assert list_classes(str(tmp_path / "split")) == ["cat", "dog"]


@pytest.mark.ray
def test_bad_files_are_rows_with_reasons(ray_session, damaged_folder):
    data, skipped = _decode(damaged_folder, 16)
    assert [p for p, _ in skipped] == ["n00000000/00000.jpg", "n00000001/notes.jpg"]
    assert "truncated" in skipped[0][1] and skipped[1][1] == "not an image PIL can read"
    assert data["image"].shape == (11, 3, 16, 16) and np.bincount(data["label"]).tolist() == [3, 4, 4]
    assert (data["image"].reshape(11, -1).max(1) > 0).all()  # no zero image of a bad file among them


def test_ids_already_selected_are_left_out_before_decoding(ray_session, damaged_folder):
    """A rerun's skip_ids: images already selected are not decoded again (the truncated JPEG among them
    is then no bad row either)."""
    listed = {r["path"]: r["image_id"] for r in read_images(damaged_folder, 16).select_columns(["path", "image_id"]).take_all()}
    skip = sorted({listed["n00000000/00000.jpg"], *sorted(listed.values())[:4]})
    rows = read_images(damaged_folder, 16, skip_ids=np.array(skip, dtype=np.int64)).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(set(listed.values()) - set(skip))
    assert all(r["error"] == "" or r["path"] == "n00000001/notes.jpg" for r in rows)


@pytest.mark.ray
def test_strict_makes_the_first_bad_file_fatal_in_one_line(ray_session, damaged_folder, capsys):
    from overinterp.cli import one_line_errors

    status, _ = one_line_errors("overinterp", lambda: read_images(damaged_folder, 16, strict=True).materialize())
    msg = capsys.readouterr().err
    assert status == 1 and msg.count("\n") == 1 and msg.startswith("overinterp: error: ")
    assert msg.rstrip().endswith(": remove the file, or drop --strict to skip it")
    assert os.path.join(damaged_folder, "n00000000", "00000.jpg") in msg or os.path.join(damaged_folder, "n00000001", "notes.jpg") in msg


@pytest.mark.ray
def test_parquet_bad_blob_is_named_by_image_id(ray_session, tmp_path):
    path = str(tmp_path / "train.parquet")
    write_encoded_parquet(path, n=4, num_classes=2, size=36)
    t = pq.read_table(path)
    blobs = t["image"].to_pylist()
    blobs[2] = blobs[2][:100]
    pq.write_table(t.set_column(0, "image", pa.array(blobs, pa.binary())).append_column("image_id", pa.array([10, 11, 12, 13], pa.int64())), path)
    data, skipped = _decode(path, 16)
    assert len(skipped) == 1 and skipped[0][0] == f"{path} image_id 12"
    assert data["image_id"].tolist() == [10, 11, 13]


@pytest.mark.ray
def test_parquet_column_types_are_checked(ray_session, tmp_path):
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"image": pa.array(["not bytes"]), "label": pa.array(["cat"])}), path)
    with pytest.raises(SourceError, match=r"train\.parquet: image is string, not binary; label is string, not an integer"):
        read_images(path, 16)
    pq.write_table(pa.table({"jpeg": pa.array([b"\xff\xd8"]), "label": pa.array([0])}), path)
    with pytest.raises(SourceError, match=r"train\.parquet: Parquet sources need columns image \(encoded bytes\) and label; missing \['image'\]"):
        read_images(path, 16)


@pytest.mark.parametrize("images", [150, None], ids=["v1-reader", "v2-reader"])
def test_a_limit_takes_the_first_images_in_file_order_every_time(ray_session, tmp_path, images):
    """--max-images N is the first N images of a split, the same for selection, training and the
    summary: Ray Data's limit would otherwise keep whichever blocks arrive first (here 4 files)."""
    from overinterp.pipeline.images import read_encoded
    from overinterp.synthetic import write_imagenet_shaped

    write_imagenet_shaped(str(tmp_path), train=0, val=400, folder_images=0, num_classes=4, rows_per_shard=100)
    for _ in range(3):
        ids = np.concatenate([b["image_id"] for b in read_encoded(str(tmp_path / "val"), limit=150, images=images).iter_batches(batch_size=None)])
        assert sorted(ids.tolist()) == list(range(150))


def test_a_small_parquet_read_takes_rays_v1_reader_and_a_big_one_v2(ray_session, tmp_path):
    """images.read_parquet picks Ray Data's reader by the read's size, for that read only; both
    readers give the same rows."""
    import ray.data

    from overinterp.pipeline.images import SMALL_READ_IMAGES, read_parquet
    from overinterp.synthetic import write_imagenet_shaped

    write_imagenet_shaped(str(tmp_path), train=0, val=40, folder_images=0, num_classes=4, rows_per_shard=10)
    default = ray.data.DataContext.get_current().use_datasource_v2
    rows, operators = {}, {}
    for name, images in (("small", SMALL_READ_IMAGES), ("big", SMALL_READ_IMAGES + 1), ("unknown", None)):
        ds = read_parquet(str(tmp_path / "val"), images).materialize()
        operators[name] = {line.split()[2].rstrip(":") for line in ds.stats().splitlines() if line.startswith("Operator ")}
        rows[name] = sorted((r["image_id"], r["label"], r["image"]) for r in ds.take_all())
        assert ray.data.DataContext.get_current().use_datasource_v2 == default
    assert "ReadParquet" in operators["small"] and "ReadFilesParquetV2" not in operators["small"]
    assert "ReadFilesParquetV2" in operators["big"] and "ReadParquet" not in operators["big"]
    assert operators["unknown"] == (operators["big"] if default else operators["small"])  # Ray's own default
    assert len(rows["small"]) == 40 and rows["small"] == rows["big"] == rows["unknown"]


def test_the_decoding_workers_import_no_torch():
    """Ray Data's read and decode tasks import this module (and the keep-mask lookup of the training
    stream); a worker process that imported torch for them spent seconds of CPU on it."""
    import subprocess
    import sys

    code = "import sys, overinterp.pipeline.images; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_parquet_footers_are_checked_without_reading_rows(tmp_path):
    from overinterp.pipeline.images import parquet_rows

    nested = str(tmp_path / "nested.parquet")  # a struct column before label: Parquet's leaf columns are not Arrow's fields
    pq.write_table(pa.table({"image": [b"x"] * 3, "size": [{"h": 500, "w": 3}] * 3, "label": [0, 1, 1]}), nested)
    assert parquet_rows(nested, 2) == 3
    with pytest.raises(SourceError, match=r"labels run to 1, beyond the 1 classes \(0..0\): give --num-classes 2"):
        parquet_rows(nested, 1)
    negative = str(tmp_path / "negative.parquet")
    pq.write_table(pa.table({"image": [b"x"], "label": [-1]}), negative)
    with pytest.raises(SourceError, match="labels run from -1"):
        parquet_rows(negative)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"image": [b"x"] * (i + 2), "label": [0] * (i + 2)}), str(folder / f"part-{i}.parquet"))
    assert parquet_rows(str(folder), 1000) == 5
    (folder / "part-9.parquet").write_text("not Parquet")
    with pytest.raises(SourceError, match=r"part-9\.parquet is not a readable Parquet file"):
        parquet_rows(str(folder))


def test_a_parquet_file_stored_in_label_order_is_named_before_training(tmp_path, capsys):
    """Training shuffles whole files and a buffer of images, not the rows of one file: a file of more
    rows than the buffer whose labels never fall (sorted, or one class) gets a warning naming it and
    the fix, whatever its row groups; shuffled rows, a file within the buffer, and the validation
    split (no buffer given) do not."""
    from overinterp.pipeline.images import parquet_rows

    def write(name, labels, **kwargs):
        path = str(tmp_path / name)
        pq.write_table(pa.table({"image": [b"x"] * len(labels), "label": labels}), path, **kwargs)
        return path

    for in_order in (write("sorted.parquet", [0] * 6 + [1] * 6), write("groups.parquet", [0] * 6 + [1] * 6, row_group_size=4),
                     write("one-class.parquet", [2] * 12)):
        assert parquet_rows(in_order, 3, shuffle_buffer=8) == 12
        assert f"{in_order} stores its 12 rows in label order" in capsys.readouterr().out
    for path, buffer in ((write("shuffled.parquet", [0, 1] * 6), 8), (in_order, 12), (in_order, None)):
        parquet_rows(path, 3, shuffle_buffer=buffer)
        assert "label order" not in capsys.readouterr().out
