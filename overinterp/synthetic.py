"""Small synthetic data sets written in real on-disk formats, for smoke tests and `--smoke-test`.

Images are learnable: each class has its own bright square position and tint on a noisy
background, so a model trained for an epoch or two is better than chance.
"""

from __future__ import annotations

import io
import os

import numpy as np

from overinterp.data import CIFAR10_LAYOUT, CIFAR100_LAYOUT


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
    """CIFAR's official *binary* version under root; returns the batches folder.

    cifar10: cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin and batches.meta.txt;
    cifar100: cifar-100-binary/{train,test}.bin, fine_label_names.txt and coarse_label_names.txt.
    Records are the label byte(s) (CIFAR-100: coarse, then fine) and 3072 planar R, G, B pixels.
    (The python version is pickles, which the loader accepts only with the published checksums.)
    """
    layout = {"cifar10": CIFAR10_LAYOUT, "cifar100": CIFAR100_LAYOUT}[dataset]
    if n_train < len(layout.bin_train) or n_test < len(layout.bin_test):
        raise ValueError(f"write_cifar needs n_train >= {len(layout.bin_train)} and n_test >= 1 (no empty batch files)")
    k = layout.label_ranges[-1]
    base = os.path.join(root, layout.bin_folder)
    os.makedirs(base, exist_ok=True)
    images, labels = synthetic_images(n_train + n_test, k, 32, 3, seed)
    splits = {"train": (images[:n_train], labels[:n_train]), "test": (images[n_train:], labels[n_train:])}
    for split, files in (("train", layout.bin_train), ("test", layout.bin_test)):
        imgs, labs = splits[split]
        for part, name in zip(np.array_split(np.arange(len(labs)), len(files)), files):
            label_bytes = [labs[part] // 5, labs[part]] if dataset == "cifar100" else [labs[part]]  # coarse = fine // 5 here
            rows = np.concatenate([np.stack(label_bytes, 1), imgs[part].reshape(len(part), -1)], 1).astype(np.uint8)
            rows.tofile(os.path.join(base, name))
    names = {layout.bin_names: [f"class{i}" for i in range(k)]}
    if dataset == "cifar100":
        names["coarse_label_names.txt"] = [f"superclass{i}" for i in range(20)]
    for fname, lines in names.items():
        with open(os.path.join(base, fname), "w") as f:
            f.write("\n".join(lines) + "\n")
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
