"""Labelled images streamed with Ray Data from a local path or s3://, decoded on the workers.

Two source layouts, chosen by what the path holds:
- an ImageFolder split: <path>/<class>/<image> (JPEG, PNG, ...); labels are the index of the class
  folder in the sorted class list of the *train* source, so train and val agree;
- Parquet of encoded images: columns `image` (encoded bytes), `label` (int) and optionally
  `image_id` (int64); a file or a folder of files.

Every row leaves as {image_id: int64, label: int64, image: uint8 (3, S, S)}, resized and centre-
cropped like `overinterp.data.resize_center_crop`. Image ids are stable across runs (the given
`image_id`, else a hash of the image's path within the source or of its bytes), which is what lets a
rerun skip images already in the store.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.fs as pafs
import ray

from overinterp import fs
from overinterp.data import IMAGE_EXTENSIONS, resize_center_crop


class SourceError(ValueError):
    """An image source that cannot be read; the message names the fix."""


def stable_id(data: bytes) -> int:
    """A non-negative int64 from the first 8 bytes of SHA-1."""
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big") & (2**63 - 1)


def _entries(path: str) -> list[pafs.FileInfo]:
    f, p = fs.resolve(path)
    info = f.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{path} does not exist: give an ImageFolder split (<path>/<class>/<image>) or Parquet of encoded images")
    if info.type == pafs.FileType.File:
        return [info]
    return f.get_file_info(pafs.FileSelector(p))


def is_parquet(path: str) -> bool:
    entries = _entries(path)
    return any(e.type == pafs.FileType.File and e.base_name.endswith(".parquet") for e in entries)


def list_classes(path: str) -> list[str]:
    """Sorted class folder names of an ImageFolder split."""
    classes = sorted(e.base_name for e in _entries(path) if e.type == pafs.FileType.Directory and not e.base_name.startswith("."))
    if not classes:
        raise SourceError(f"{path} has no class sub-folders: expected {path}/<class>/<image>")
    return classes


def _decode(image_bytes, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as im:
        return resize_center_crop(im, size)


def _decode_folder(batch: dict, root: str, classes: list[str], size: int) -> dict:
    index = {c: i for i, c in enumerate(classes)}
    rel = [p[len(root):].lstrip("/") if p.startswith(root) else p for p in batch["path"]]
    labels = []
    for r, p in zip(rel, batch["path"]):
        cls = r.split("/")[0]
        if cls not in index:
            raise SourceError(f"{p}: class folder {cls!r} is not among the train classes")
        labels.append(index[cls])
    return {
        "image_id": np.array([stable_id(r.encode()) for r in rel], dtype=np.int64),
        "label": np.array(labels, dtype=np.int64),
        "image": np.stack([_decode(b, size) for b in batch["bytes"]]),
    }


def _decode_parquet(batch: dict, size: int) -> dict:
    ids = batch.get("image_id")
    return {
        "image_id": np.asarray(ids, dtype=np.int64) if ids is not None else np.array([stable_id(bytes(b)) for b in batch["image"]], dtype=np.int64),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "image": np.stack([_decode(bytes(b), size) for b in batch["image"]]),
    }


def read_images(path: str, image_size: int, classes: list[str] | None = None, limit: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset of decoded, labelled images from an ImageFolder split or encoded Parquet.

    Args:
        classes: the class order for folder sources (the train split's); None for Parquet.
        limit: keep only the first `limit` images (smoke runs, pilots).
    """
    if is_parquet(path):
        ds = ray.data.read_parquet(path)
        missing = {"image", "label"} - set(ds.schema().names)
        if missing:
            raise SourceError(f"{path}: Parquet sources need columns image (encoded bytes) and label; missing {sorted(missing)}")
        if limit:
            ds = ds.limit(limit)
        return ds.map_batches(_decode_parquet, fn_kwargs={"size": image_size}, batch_format="numpy", batch_size=64)
    if classes is None:
        classes = list_classes(path)
    _, root = fs.resolve(path)
    exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS] + [e.lstrip(".").upper() for e in IMAGE_EXTENSIONS]
    ds = ray.data.read_binary_files(path, include_paths=True, file_extensions=exts)
    if limit:
        ds = ds.limit(limit)
    return ds.map_batches(_decode_folder, fn_kwargs={"root": root.rstrip("/"), "classes": classes, "size": image_size},
                          batch_format="numpy", batch_size=64)


def materialize(ds: ray.data.Dataset) -> dict[str, np.ndarray]:
    """All rows in memory, sorted by image id: {"image_id", "label", "image"}.

    For training on subsets; bounded by the driver's memory (see README: a full ImageNet needs a
    streaming trainer, which this project does not have yet).
    """
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        raise SourceError("the image source yielded no images")
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image_id", "label", "image")}
    order = np.argsort(out["image_id"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if len(np.unique(out["image_id"])) != len(order):
        raise SourceError("two images share an image id (identical files, or duplicate image_id values)")
    return out
