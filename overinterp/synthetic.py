"""Synthetic data sets written in real on-disk formats: small ones for smoke tests and
`--smoke-test`, and ImageNet's full count in tiny images for runs at its scale:

    python -m overinterp.synthetic imagenet-shaped OUT_DIR [--train N --val N --size PX --folder-images N]

Images are learnable: each class has its own bright square position and tint on a noisy
background, so a model trained for an epoch or two is better than chance (with few classes).
"""

from __future__ import annotations

import io
import os

import numpy as np

from overinterp.data import CIFAR10_LAYOUT, CIFAR100_LAYOUT


def synthetic_images(n: int, num_classes: int, size: int, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, C, S, S) and int64 labels (n,), classes balanced."""
    labels = np.arange(n, dtype=np.int64) % num_classes
    return class_images(labels, num_classes, size, np.random.default_rng(seed), channels), labels


def class_images(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """uint8 images (n, C, S, S) of the given int labels (n,): noise in [0, 96) and the class's square."""
    images = rng.integers(0, 96, (len(labels), channels, size, size), dtype=np.uint8)
    side = max(2, size // 4)
    k = np.arange(num_classes)
    y, x, px = (k * side) % (size - side + 1), (k * 2 * side) % (size - side + 1), np.arange(size)
    in_y = (px >= y[:, None]) & (px < y[:, None] + side)  # (K, S)
    in_x = (px >= x[:, None]) & (px < x[:, None] + side)
    square = in_y[:, :, None] & in_x[:, None, :]  # (K, S, S)
    tint = (160 + (np.arange(channels) * 30 + k[:, None] * 11) % 96).astype(np.uint8)  # (K, C)
    return np.where(square[labels][:, None], tint[labels][:, :, None, None], images)


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


# --- ImageNet's shape at full count ------------------------------------------------------------
# ImageNet-1k: 1,281,167 train images in 1,000 classes of 732 to 1,300 each, and 50 val images a class.
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
IMAGENET_SMALLEST = 732 / 1300  # smallest train class / largest
_TAG = b"overinterp_synthetic"  # shard metadata: what the shard holds, so a rerun knows it is complete


def class_counts(total: int, num_classes: int, smallest: float = 1.0) -> np.ndarray:
    """(K,) int64 images per class, summing to `total`: the first 6.5% of the classes ramp from
    `smallest` times the largest class up to it, the rest are equal (largest remainders make the
    sum exact). ImageNet's train split (smallest = IMAGENET_SMALLEST) gives 732 to 1,300, 877 at 1,300."""
    ramp = max(1, round(0.065 * num_classes))
    weight = np.minimum(1.0, smallest + (1 - smallest) * np.arange(num_classes) / ramp)
    exact = total * weight / weight.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    return counts


def shuffled_labels(counts: np.ndarray, seed: int) -> np.ndarray:
    """(sum(counts),) int64 labels, class c `counts[c]` times, in a fixed random order (the first N
    rows of a split, as --max-images reads them, cover every class)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def _write_shard(path: str, labels: np.ndarray, start: int, tag: str, num_classes: int, size: int, seed: int, fmt: str) -> int:
    """Rows start.. of a split (image_id = row number) as one Parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = class_images(labels, num_classes, size, np.random.default_rng([seed, start]))  # (n, 3, S, S)
    table = pa.table({"image": pa.array([encode(im, fmt) for im in images], pa.binary()),
                      "label": pa.array(labels, pa.int64()), "image_id": pa.array(np.arange(start, start + len(labels)), pa.int64())})
    tmp = f"{os.path.dirname(path)}/.tmp-{os.getpid()}-{os.path.basename(path)}"
    pq.write_table(table.replace_schema_metadata({_TAG: tag}), tmp, row_group_size=10_000)  # ~3 MB groups at 8 px
    os.replace(tmp, path)
    return len(labels)


def _write_class_folder(folder: str, labels: np.ndarray, num_classes: int, size: int, seed: int, fmt: str) -> int:
    """One class folder of image files, written under a hidden name then renamed: it exists whole or not at all."""
    import shutil

    tmp = f"{os.path.dirname(folder)}/.tmp-{os.path.basename(folder)}"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier attempt
    os.makedirs(tmp)
    for i, im in enumerate(class_images(labels, num_classes, size, np.random.default_rng([seed, int(labels[0])]))):
        with open(f"{tmp}/{i:05d}.{fmt.lower()}", "wb") as f:
            f.write(encode(im, fmt))
    os.replace(tmp, folder)
    return len(labels)


def write_imagenet_shaped(out: str, train: int = IMAGENET_TRAIN, val: int = IMAGENET_VAL, size: int = 8, folder_images: int = 100_000,
                          num_classes: int = IMAGENET_CLASSES, rows_per_shard: int = 50_000, workers: int = 1, seed: int = 0,
                          fmt: str = "PNG") -> dict[str, int]:
    """ImageNet's counts in tiny images: Parquet of encoded images and an ImageFolder, restartable.

    Layout under out: train/ and val/ hold part-NNNNN.parquet of `rows_per_shard` rows each (columns
    image, label, image_id = row number in the split); folder/train/<class>/ and folder/val/<class>/
    hold `folder_images` image files split like ImageNet's train and val. Train classes are uneven
    (class_counts with IMAGENET_SMALLEST), val classes even. A shard or class folder already written
    by the same call is kept; one written with other arguments stops the run (use a new `out`).

    Args:
        size: image side in pixels; fmt: "PNG" (lossless, ~270 bytes at 8 px) or "JPEG".
        workers: processes encoding at once (1: this process).
    Returns: images written now per part ("train", "val", "folder/train", "folder/val").
    """
    import contextlib
    import json
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow.parquet as pq

    from overinterp.progress import Progress

    classes = [f"n{c:08d}" for c in range(num_classes)]
    f_train = round(folder_images * IMAGENET_TRAIN / (IMAGENET_TRAIN + IMAGENET_VAL))
    parts = {"train": (train, IMAGENET_SMALLEST), "val": (val, 1.0),
             "folder/train": (f_train, IMAGENET_SMALLEST), "folder/val": (folder_images - f_train, 1.0)}
    tasks, written = [], dict.fromkeys(parts, 0)
    for s, (part, (n, smallest)) in enumerate(parts.items()):
        d = os.path.join(out, part)
        os.makedirs(d, exist_ok=True)
        counts = class_counts(n, num_classes, smallest)
        if part.startswith("folder/"):
            for c in np.flatnonzero(counts):
                if not os.path.isdir(os.path.join(d, classes[c])):
                    tasks.append((part, _write_class_folder, os.path.join(d, classes[c]), np.full(counts[c], c), num_classes, size, seed + s, fmt))
            continue
        labels = shuffled_labels(counts, seed + s)
        names = set()
        for start in range(0, n, rows_per_shard):
            path = os.path.join(d, f"part-{start // rows_per_shard:05d}.parquet")
            names.add(os.path.basename(path))
            tag = json.dumps({"split": part, "rows": [start, min(n, start + rows_per_shard)], "of": n, "classes": num_classes,
                              "size": size, "seed": seed, "format": fmt})
            if os.path.exists(path) and (pq.read_schema(path).metadata or {}).get(_TAG, b"").decode() == tag:
                continue
            tasks.append((part, _write_shard, path, labels[start : start + rows_per_shard], start, tag, num_classes, size, seed + s, fmt))
        for tmp in (x for x in os.listdir(d) if x.startswith(".tmp-")):  # an interrupted earlier attempt's
            os.remove(os.path.join(d, tmp))
        foreign = sorted(set(x for x in os.listdir(d) if x.endswith(".parquet")) - names)
        if foreign or any(os.path.exists(t[2]) for t in tasks if t[0] == part):
            raise SystemExit(f"{d} holds Parquet files of other arguments ({(foreign or ['a shard'])[0]}): choose a new OUT_DIR, or delete {d}")
    total = sum(len(t[3]) for t in tasks)
    bar = Progress(total, "images", f"imagenet-shaped {out}", interval=5.0)
    if total < sum(n for n, _ in parts.values()):
        print(f"{out}: {sum(n for n, _ in parts.values()) - total:,} images already written, {total:,} to go", flush=True)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        for part, done in zip([t[0] for t in tasks], (pool.map if pool else map)(_call, [t[1:] for t in tasks])):
            written[part] += done
            bar.update(done)
    bar.close()
    return written


def _call(task: tuple) -> int:
    return task[0](*task[1:])


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m overinterp.synthetic", description="Synthetic data sets in real on-disk formats.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("imagenet-shaped", help=write_imagenet_shaped.__doc__.splitlines()[0])
    g.add_argument("out_dir")
    g.add_argument("--train", type=int, default=IMAGENET_TRAIN, help="train images (Parquet)")
    g.add_argument("--val", type=int, default=IMAGENET_VAL, help="val images (Parquet)")
    g.add_argument("--size", type=int, default=8, help="image side, pixels")
    g.add_argument("--folder-images", type=int, default=100_000, help="images in the ImageFolder, train and val together")
    g.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    g.add_argument("--rows-per-shard", type=int, default=50_000)
    g.add_argument("--format", choices=("PNG", "JPEG"), default="PNG")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes encoding at once")
    a = p.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("train", a.train), ("val", a.val), ("folder_images", a.folder_images)) if v < 0]
    bad += [f"--{k.replace('_', '-')} {v}" for k, v in (("size", a.size), ("classes", a.classes), ("rows_per_shard", a.rows_per_shard),
                                                        ("workers", a.workers)) if v < 1]
    if bad:
        p.error(f"{', '.join(bad)}: counts must be >= 0, sizes and workers >= 1")
    t0 = time.monotonic()
    done = write_imagenet_shaped(a.out_dir, a.train, a.val, a.size, a.folder_images, a.classes, a.rows_per_shard, a.workers, fmt=a.format)
    print(f"{a.out_dir}: wrote {', '.join(f'{n:,} {k}' for k, n in done.items())} images in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
