"""Data sets: the embedded digits, CIFAR in its real on-disk format, ImageNet-style folders."""

import math
import os
import pickle

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
)


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


def _write_cifar(root, folder, train_files, test_files, meta_file, meta_key, label_key, n=4):
    base = os.path.join(root, folder)
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name in train_files + test_files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, label_key: list(range(n))}, f)
    with open(os.path.join(base, meta_file), "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(10)]}, f)
    return base


def test_cifar10_real_on_disk_format(tmp_path):
    base = _write_cifar(str(tmp_path), "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                        "batches.meta", "label_names", "labels")
    d = load_cifar10(str(tmp_path))
    assert d.images["train"].shape == (20, 3, 32, 32) and d.images["test"].shape == (4, 3, 32, 32)
    with open(os.path.join(base, "test_batch"), "rb") as f:
        raw = pickle.load(f)["data"]
    # channel-planar rows become (C, H, W): red plane first
    assert np.array_equal(d.images["test"][1, 0].reshape(-1), raw[1, :1024])
    assert np.array_equal(d.images["test"][1, 2].reshape(-1), raw[1, 2048:])
    assert d.labels["test"].tolist() == [0, 1, 2, 3] and d.classes[0] == "class0"
    assert d.mean[0] == pytest.approx(125.3 / 255)


def test_cifar100_fine_labels(tmp_path):
    _write_cifar(str(tmp_path), "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels")
    d = load_cifar100(str(tmp_path))
    assert d.images["train"].shape == (4, 3, 32, 32) and d.labels["train"].tolist() == [0, 1, 2, 3]


def test_cifar_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", str(tmp_path))  # exists but empty


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


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train/"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(DataError, match="drop --download"):
        check_dataset_args("imagefolder", str(tmp_path), True)


def test_unknown_dataset():
    with pytest.raises(DataError, match="choose one of digits, cifar10"):
        check_dataset_args("mnist", None, False)


def test_subsample_is_seeded():
    d = load_digits()
    a, b = d.subsample(10, 5), d.subsample(10, 5)
    assert a.images["train"].shape[0] == 10 and np.array_equal(a.labels["test"], b.labels["test"])
