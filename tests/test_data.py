"""Data sets: the embedded digits, CIFAR in its real on-disk format, ImageNet-style folders."""

import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from overinterp.data import (
    DataError,
    check_dataset_args,
    denormalize_uint8,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    normalize,
    skipped_line,
    skipped_summary,
)
from overinterp.synthetic import synthetic_images, write_cifar, write_imagefolder


def test_digits_fixed_stratified_split():
    d = load_digits()
    assert d.images["train"].shape == (1433, 1, 8, 8) and d.images["test"].shape == (364, 1, 8, 8)
    assert d.images["train"].dtype == np.uint8 and d.images["train"].max() == 255
    per_class = np.bincount(d.labels["test"]) + np.bincount(d.labels["train"])
    assert np.bincount(d.labels["test"]).tolist() == [math.ceil(0.2 * n) for n in per_class]  # stratified
    again = load_digits()
    assert np.array_equal(d.labels["test"], again.labels["test"]) and np.array_equal(d.images["test"], again.images["test"])
    x = normalize(torch.from_numpy(d.images["train"]), d.mean, d.std)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_digits_upsampled_keep_split_and_labels():
    d8, d32 = load_digits(), load_digits(image_size=32)
    assert d32.images["train"].shape == (1433, 1, 32, 32) and d32.images["test"].shape == (364, 1, 32, 32)
    assert d32.images["train"].dtype == np.uint8 and d32.name == "digits32" and d8.name == "digits"
    assert np.array_equal(d32.labels["test"], d8.labels["test"]) and np.array_equal(d32.labels["train"], d8.labels["train"])
    # the same digits: each 4x4 block's mean follows its 8x8 pixel (bilinear smooths the edges)
    blocks = d32.images["test"].reshape(364, 1, 8, 4, 8, 4).astype(float).mean((3, 5))
    assert np.corrcoef(blocks.ravel(), d8.images["test"].ravel())[0, 1] > 0.95
    assert d32.images["test"].max() <= d8.images["test"].max()  # interpolation never overshoots
    x = normalize(torch.from_numpy(d32.images["train"]), d32.mean, d32.std)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_normalize_roundtrip_and_mask_is_mean():
    imgs = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    back = denormalize_uint8(normalize(imgs, mean, std), mean, std)
    assert np.array_equal(back, imgs.permute(0, 2, 3, 1).numpy())
    masked = denormalize_uint8(torch.zeros(1, 3, 1, 1), mean, std)[0, 0, 0]  # 0 after normalisation
    assert masked.tolist() == [round(255 * m) for m in mean]


# --- CIFAR: binary version parsed by hand, python version only with the published MD5 sums ---------


def _records(labels, rng):
    """CIFAR binary records: the label bytes of each row, then 3072 random pixel bytes (planar R, G, B)."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(len(labels), -1)
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], 1), pixels


def test_cifar10_binary_hand_built_bytes(tmp_path):
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for i, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        rows, pixels[name] = _records([i, 9 - i], rng)  # two records per file
        (base / name).write_bytes(rows.tobytes())
    (base / "batches.meta.txt").write_text("\n".join(f"name{i}" for i in range(10)) + "\n\n")  # trailing blank line, as shipped
    d = load_cifar10(str(tmp_path))
    assert d.images["train"].shape == (10, 3, 32, 32) and d.images["test"].shape == (2, 3, 32, 32)
    assert d.labels["train"].tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and d.labels["test"].tolist() == [5, 4]
    raw = pixels["test_batch.bin"]
    # planar rows become (C, H, W): 1024 red bytes first, row-major; blue last
    assert np.array_equal(d.images["test"][1, 0], raw[1, :1024].reshape(32, 32))
    assert np.array_equal(d.images["test"][1, 2], raw[1, 2048:].reshape(32, 32))
    assert np.array_equal(d.images["train"][3], pixels["data_batch_2.bin"][1].reshape(3, 32, 32))
    assert d.classes == tuple(f"name{i}" for i in range(10)) and d.skipped == {}
    assert d.mean[0] == pytest.approx(125.3 / 255)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    rng = np.random.default_rng(1)
    rows, pixels = _records([[0, 3], [19, 99], [7, 42]], rng)  # (coarse, fine) per record
    (base / "train.bin").write_bytes(rows.tobytes())
    (base / "test.bin").write_bytes(rows[:1].tobytes())
    (base / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    d = load_cifar100(str(tmp_path))
    assert d.labels["train"].tolist() == [3, 99, 42] and d.labels["test"].tolist() == [3]
    assert np.array_equal(d.images["train"].reshape(3, -1), pixels) and d.num_classes == 100


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_write_cifar_round_trip(tmp_path, dataset):
    base = write_cifar(str(tmp_path), n_train=12, n_test=5, dataset=dataset, seed=3)
    assert os.path.basename(base) == ("cifar-10-batches-bin" if dataset == "cifar10" else "cifar-100-binary")
    k = 10 if dataset == "cifar10" else 100
    images, labels = synthetic_images(17, k, 32, 3, 3)
    d = load_dataset(dataset, str(tmp_path))
    assert np.array_equal(d.images["train"], images[:12]) and np.array_equal(d.images["test"], images[12:])
    assert np.array_equal(d.labels["train"], labels[:12]) and np.array_equal(d.labels["test"], labels[12:])
    assert d.num_classes == k


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"data_batch_3\.bin: 12192 bytes is not a whole number of 3073-byte CIFAR records"),
        (lambda p: p.write_bytes(b""), r"data_batch_3\.bin: 0 bytes"),
        (lambda p: p.write_bytes(b"\x0a" + p.read_bytes()[1:]), r"data_batch_3\.bin: record 0 has label byte 0 = 10, outside 0\.\.9"),
        (lambda p: p.unlink(), r"data_batch_3\.bin is missing: restore it from https://www\.cs\.toronto\.edu/~kriz/cifar-10-binary"),
        (lambda p: (p.parent / "batches.meta.txt").write_text("a\nb\n"), r"batches\.meta\.txt lists 2 class names, not 10"),
    ],
)
def test_cifar_binary_bad_files_are_named(tmp_path, damage, match):
    base = write_cifar(str(tmp_path), n_train=20, n_test=4)  # 4 records per train file
    damage(tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin")
    with pytest.raises(DataError, match=match) as e:
        load_cifar10(str(tmp_path))
    assert "\n" not in str(e.value) and base in str(e.value)


class _WritesMarker:
    """A pickle payload: unpickling it calls os.makedirs, which creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _write_python_cifar10(root, payload=None, n=4, seed=0):
    """cifar-10-batches-py with every expected file name; each file is `payload` if given, else a
    benign batch of n random images. Returns {file: (pixels, labels)} for the benign batches."""
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(payload if payload is not None else {"data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump(payload if payload is not None else {"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_crafted_cifar_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    _write_python_cifar10(str(tmp_path / "data"), payload=_WritesMarker(marker))
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "proof")))  # the payload does run when unpickled
    assert (tmp_path / "proof").exists()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "data"))
    msg = str(e.value)
    assert "cifar-10-batches-py/data_batch_1 does not match the published MD5" in msg
    assert "--download" in msg and "cifar-10-batches-bin" in msg and "\n" not in msg
    assert not marker.exists()


def test_binary_version_is_preferred_over_pickles(tmp_path):
    marker = tmp_path / "pwned"
    _write_python_cifar10(str(tmp_path), payload=_WritesMarker(marker))
    write_cifar(str(tmp_path), n_train=10, n_test=5)
    assert load_cifar10(str(tmp_path)).images["train"].shape == (10, 3, 32, 32)
    assert not marker.exists()


def test_python_version_loads_when_sums_match_and_equals_binary(tmp_path, monkeypatch):
    """The checked pickle path end to end. Synthetic pickles cannot match CIFAR's published sums,
    so the test puts its own files' sums in torchvision's table (the loader itself is unchanged)."""
    import hashlib

    import torchvision.datasets as tvd

    written = _write_python_cifar10(str(tmp_path))
    base = tmp_path / "cifar-10-batches-py"
    md5 = {f: hashlib.md5((base / f).read_bytes()).hexdigest() for f in os.listdir(base)}
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]})
    py = load_cifar10(str(tmp_path))

    # the same images and labels in the binary version give identical arrays
    binary = tmp_path / "bin"
    (binary / "cifar-10-batches-bin").mkdir(parents=True)
    for name, (data, labels) in written.items():
        rows = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], data], 1)
        (binary / "cifar-10-batches-bin" / f"{name}.bin").write_bytes(rows.tobytes())
    (binary / "cifar-10-batches-bin" / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    b = load_cifar10(str(binary))
    for split in ("train", "test"):
        assert np.array_equal(py.images[split], b.images[split]) and np.array_equal(py.labels[split], b.labels[split])
    assert py.classes == b.classes

    (base / "test_batch").write_bytes((base / "test_batch").read_bytes() + b"\0")  # one byte more: refused
    with pytest.raises(DataError, match="test_batch does not match the published MD5"):
        load_cifar10(str(tmp_path))


def test_cifar_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds neither cifar-10-batches-py/ nor cifar-10-batches-bin/: add --download"):
        load_dataset("cifar10", str(tmp_path))  # exists but empty
    os.makedirs(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match="cifar-10-batches-py/data_batch_1 is missing: add --download"):
        load_dataset("cifar10", str(tmp_path))


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(2):
                arr = rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)
                ext = "jpg" if i == 0 else "png"
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.{ext}")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert d.images["train"].shape == (4, 3, 16, 16) and d.images["test"].shape == (4, 3, 16, 16)
    assert d.classes == ("cat", "dog") and d.labels["test"].tolist() == [0, 0, 1, 1]
    assert d.skipped == {"train": (), "test": ()}  # notes.txt is not an image file: ignored, not skipped


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train/"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(DataError, match="drop --download"):
        check_dataset_args("imagefolder", str(tmp_path), True)


def _damage(root):
    """A truncated JPEG and a text file named .jpg in the train split of a write_imagefolder tree."""
    jpg = root / "train" / "n00000000" / "00000.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (root / "train" / "n00000001" / "notes.jpg").write_text("not an image")


def test_imagefolder_skips_and_records_bad_files(tmp_path):
    write_imagefolder(str(tmp_path), n_per_class=4, num_classes=3, size=40)
    _damage(tmp_path)
    d = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert d.images["train"].shape == (11, 3, 16, 16) and d.images["test"].shape == (12, 3, 16, 16)
    assert np.bincount(d.labels["train"]).tolist() == [3, 4, 4]
    train = d.skipped["train"]  # paths in the split's folder, as a streamed run records them
    assert [p for p, _ in train] == ["n00000000/00000.jpg", "n00000001/notes.jpg"] and d.skipped["test"] == ()
    assert "truncated" in train[0][1] and train[1][1] == "not an image PIL can read"
    assert d.subsample(5, 5).skipped == d.skipped
    assert skipped_summary(train, first=1) == {"count": 2, "first": [{"path": "n00000000/00000.jpg", "reason": train[0][1]}]}
    line = skipped_line(train, first=1)
    assert line.startswith("skipped 2 image(s)") and "n00000000/00000.jpg" in line and "and 1 more" in line


def test_imagefolder_strict_makes_a_bad_file_fatal(tmp_path):
    write_imagefolder(str(tmp_path), n_per_class=2, num_classes=2, size=40)
    _damage(tmp_path)
    with pytest.raises(DataError, match=r"train/n00000000/00000\.jpg: cannot decode \(OSError: image file is truncated.*drop --strict"):
        load_dataset("imagefolder", str(tmp_path), image_size=16, strict=True)


def test_imagefolder_all_bad_in_a_class_is_fatal(tmp_path):
    write_imagefolder(str(tmp_path), n_per_class=2, num_classes=2, size=40)
    for f in (tmp_path / "val" / "n00000001").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(DataError, match=r"val/n00000001: none of its 2 images could be decoded \(first: val/n00000001/"):
        load_dataset("imagefolder", str(tmp_path), image_size=16)


def _empty_train_class(r):
    (r / "train" / "n00000009").mkdir()


def _train_class_without_images(r):
    (r / "train" / "n00000009").mkdir()
    (r / "train" / "n00000009" / "readme.txt").write_text("not an image file")


def _empty_val_class(r):
    for f in (r / "val" / "n00000001").iterdir():
        f.unlink()


def _val_class_not_in_train(r):
    (r / "val" / "extra").mkdir()


def _val_without_classes(r):
    for c in (r / "val").iterdir():
        shutil.rmtree(c)


def _no_images_at_all(r):
    for split in ("train", "val"):
        shutil.rmtree(r / split)
        (r / split).mkdir()


@pytest.mark.parametrize(
    "change, match",
    [
        (_empty_train_class, r"train/n00000009 holds no images \(\.jpg, .*\): remove it, or add images"),
        (_train_class_without_images, r"train/n00000009 holds no images"),
        (_empty_val_class, r"val/n00000001 holds no images"),
        (_val_class_not_in_train, r"val/extra: class folder 'extra' is not among the train classes: remove it, or add .*/train/extra/"),
        (_val_without_classes, r"no images under .*/val/: expected .*/train/<class>/<image>"),
        (_no_images_at_all, r"/train has no class sub-folders: expected"),
    ],
)
def test_imagefolder_layout_errors_name_the_folder(tmp_path, change, match):
    write_imagefolder(str(tmp_path), n_per_class=2, num_classes=2, size=40)
    change(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert "\n" not in str(e.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="choose one of digits, cifar10"):
        check_dataset_args("mnist", None, False)


def test_subsample_is_seeded():
    d = load_digits()
    a, b = d.subsample(10, 5), d.subsample(10, 5)
    assert a.images["train"].shape[0] == 10 and np.array_equal(a.labels["test"], b.labels["test"])
