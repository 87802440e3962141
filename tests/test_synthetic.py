"""overinterp/synthetic.py's ImageNet-shaped generator: exact counts and class spread in the real
on-disk formats, read back by the streamed source; a rerun keeps what is written."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from overinterp.pipeline.images import check_folder, list_classes, read_images
from overinterp.pipeline.stream import count_images
from overinterp.synthetic import IMAGENET_SMALLEST, class_counts, main, write_imagenet_shaped


def test_class_counts_at_imagenet_size_match_its_total_and_range():
    counts = class_counts(1_281_167, 1000, IMAGENET_SMALLEST)
    assert counts.sum() == 1_281_167 and counts.min() == 732 and counts.max() == 1300
    assert class_counts(50_000, 1000).tolist() == [50] * 1000


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shaped"))
    written = write_imagenet_shaped(out, train=2_345, val=120, size=8, folder_images=260, num_classes=12, rows_per_shard=1_000)
    return out, written


def test_parquet_splits_hold_exactly_the_requested_images_per_class(shaped):
    out, written = shaped
    assert written == {"train": 2_345, "val": 120, "folder/train": 250, "folder/val": 10}
    for split, n, smallest in (("train", 2_345, IMAGENET_SMALLEST), ("val", 120, 1.0)):
        table = pq.read_table(f"{out}/{split}")
        assert table.num_rows == n and table.column("image").type == "binary"
        assert sorted(table.column("image_id").to_pylist()) == list(range(n))
        assert np.bincount(table.column("label").to_numpy(), minlength=12).tolist() == class_counts(n, 12, smallest).tolist()
        assert count_images(f"{out}/{split}", None, None) == n  # from the footers
    assert len(pq.ParquetDataset(f"{out}/train").files) == 3  # 1,000 rows a shard


def test_the_folder_is_an_imagefolder_the_streamed_source_counts(shaped):
    out, _ = shaped
    classes = list_classes(f"{out}/folder/train")
    counts = check_folder(f"{out}/folder/train", classes)
    assert len(classes) == 12 and sum(counts.values()) == 250
    assert [counts[c] for c in classes] == class_counts(250, 12, IMAGENET_SMALLEST).tolist()
    assert count_images(f"{out}/folder/val", classes, None) == 10


def test_streamed_source_decodes_the_parquet_images(ray_session, shaped):
    out, _ = shaped
    rows = read_images(f"{out}/val", 8, limit=40).take_all()
    assert len(rows) == 40 and all(r["error"] == "" and r["image"].shape == (3, 8, 8) for r in rows)


def test_a_rerun_writes_nothing_and_other_arguments_are_refused(shaped, capsys):
    out, _ = shaped
    main(["imagenet-shaped", out, "--train", "2345", "--val", "120", "--size", "8", "--folder-images", "260", "--classes", "12",
          "--rows-per-shard", "1000", "--workers", "1"])
    assert "wrote 0 train, 0 val, 0 folder/train, 0 folder/val images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other arguments"):
        write_imagenet_shaped(out, train=2_346, val=120, size=8, folder_images=260, num_classes=12, rows_per_shard=1_000)
