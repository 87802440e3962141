"""Small synthetic data sets written in real on-disk formats, for smoke tests and `--smoke-test`.

Images are learnable: each class has its own bright square position and tint on a noisy
background, so a model trained for an epoch or two is better than chance.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np


def synthetic_images(n: int, num_classes: int, size: int, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, C, S, S) and int64 labels (n,), classes balanced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    images = rng.integers(0, 96, (n, channels, size, size), dtype=np.uint8)
    side = max(2, size // 4)
    for i, c in enumerate(labels):
        y = (c * side) % (size - side + 1)
        x = (c * 2 * side) % (size - side + 1)
        images[i, :, y : y + side, x : x + side] = (160 + (np.arange(channels) * 30 + c * 11) % 96)[:, None, None]
    return images, labels


def write_cifar(root: str, n_train: int = 50, n_test: int = 10, dataset: str = "cifar10", seed: int = 0) -> str:
    """CIFAR's python pickles under root (torchvision's layout); returns the batches folder."""
    if dataset == "cifar10":
        folder, train_files, test_files = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta, meta_key, label_key, k = "batches.meta", "label_names", "labels", 10
    else:
        folder, train_files, test_files = "cifar-100-python", ["train"], ["test"]
        meta, meta_key, label_key, k = "meta", "fine_label_names", "fine_labels", 100
    base = os.path.join(root, folder)
    os.makedirs(base, exist_ok=True)
    images, labels = synthetic_images(n_train + n_test, k, 32, 3, seed)
    splits = {"train": (images[:n_train], labels[:n_train]), "test": (images[n_train:], labels[n_train:])}
    for split, files in (("train", train_files), ("test", test_files)):
        imgs, labs = splits[split]
        for part, name in zip(np.array_split(np.arange(len(labs)), len(files)), files):
            rows = imgs[part].reshape(len(part), 3 * 32 * 32)  # planar R, G, B rows, as CIFAR stores them
            with open(os.path.join(base, name), "wb") as f:
                pickle.dump({"data": rows, label_key: labs[part].tolist(), "batch_label": name}, f)
    with open(os.path.join(base, meta), "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, f)
    return base


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    """(C, H, W) uint8 -> encoded image bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format=fmt, quality=95) if fmt == "JPEG" else Image.fromarray(image.transpose(1, 2, 0)).save(buf, format=fmt)
    return buf.getvalue()


def write_imagefolder(root: str, n_per_class: int = 4, num_classes: int = 3, size: int = 48, seed: int = 0) -> list[str]:
    """root/{train,val}/<class>/<i>.jpg (every third image a PNG); returns the class names."""
    classes = [f"n{c:08d}" for c in range(num_classes)]  # ImageNet-style WordNet ids
    for s, split in enumerate(("train", "val")):
        images, labels = synthetic_images(n_per_class * num_classes, num_classes, size, 3, seed + s)
        for i, (img, c) in enumerate(zip(images, labels)):
            d = os.path.join(root, split, classes[c])
            os.makedirs(d, exist_ok=True)
            fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "jpg")
            with open(os.path.join(d, f"{i:05d}.{ext}"), "wb") as f:
                f.write(encode(img, fmt))
    return classes


def write_encoded_parquet(path: str, n: int = 12, num_classes: int = 3, size: int = 48, seed: int = 0) -> None:
    """One Parquet file of encoded images: columns image (JPEG bytes) and label (int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = synthetic_images(n, num_classes, size, 3, seed)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    table = pa.table({"image": pa.array([encode(im) for im in images], pa.binary()), "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path)
