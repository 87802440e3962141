"""The Parquet store of selections: one row per (image, split, model, selector).

Layout under a root (a local path or any URI pyarrow understands, e.g. s3://bucket/prefix):

    <root>/<model>/<selector tag>/<split>/part-<first id>-<n>-<uuid>.parquet

Every file carries SCHEMA (with its version in the schema metadata); readers reject other
versions, any other columns or types (checked before reading data), and duplicate image ids. Files are written atomically (temporary name, then rename on
local disks; object stores publish a PUT whole), so a crash never leaves a partial shard, and a
rerun skips the image ids already present.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from overinterp import fs as files

SCHEMA_VERSION = "1"
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # index within its split
        pa.field("split", pa.string(), nullable=False),  # "train" | "test"
        pa.field("label", pa.int32(), nullable=False),  # true class
        pa.field("pred", pa.int32(), nullable=False),  # class c explained (predicted on the full image); -1 for model-free selectors
        pa.field("confidence", pa.float32(), nullable=False),  # p(c) on the full image; NaN for model-free selectors
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("order", pa.list_(pa.int32()), nullable=False),  # HW pixel ids, earliest removal first
        pa.field("curve", pa.list_(pa.float32()), nullable=True),  # HW p(c) after each removal; null for random
        pa.field("model", pa.string(), nullable=False),  # model tag, e.g. digits_cnn-s0, or "none"
        pa.field("selector", pa.string(), nullable=False),  # selector tag, e.g. backselect, random-seed0
        pa.field("selector_params", pa.string(), nullable=False),  # JSON of the selector's parameters
    ],
    metadata={"overinterp_schema_version": SCHEMA_VERSION},
)


class StoreError(RuntimeError):
    """A store file that is not ours, from another schema version, or inconsistent."""


@dataclass
class Selections:
    """Rows of one (model, selector, split) read back as tensors, sorted by image id."""

    image_id: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64
    pred: np.ndarray  # (N,) int64
    confidence: torch.Tensor  # (N,) float32
    order: torch.Tensor  # (N, HW) int64
    curve: torch.Tensor | None  # (N, HW) float32, or None for model-free selectors
    height: int
    width: int

    def keep_mask(self, fraction: float) -> torch.Tensor:
        """(N, HW) bool: the last ceil(fraction * HW) pixels of each image's order."""
        from overinterp.selection import keep_mask

        return keep_mask(self.order, fraction)

    def sis_mask(self, tau: float) -> torch.Tensor:
        """(N, HW) bool: each image's SIS at tau (empty where it has none)."""
        from overinterp.selection import sis_mask

        if self.curve is None:
            raise StoreError("this selector stores no p(c) curve (a model-free selector): SIS needs one")
        return sis_mask(self.order, self.curve, self.confidence, tau)


def _dir(root: str, model: str, selector: str, split: str) -> tuple[pafs.FileSystem, str]:
    fs, base = files.resolve(root)
    return fs, f"{base}/{model}/{selector}/{split}"


def write_rows(
    root: str,
    *,
    model: str,
    selector: str,
    selector_params: str,
    split: str,
    image_id: np.ndarray,
    label: np.ndarray,
    order: torch.Tensor,
    height: int,
    width: int,
    pred: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
    curve: torch.Tensor | None = None,
) -> str:
    """Write one shard atomically; returns its path. order/curve: (N, HW) on any device."""
    n = len(image_id)
    order_np = order.detach().cpu().numpy().astype(np.int32)
    if order_np.shape != (n, height * width):
        raise StoreError(f"order has shape {order_np.shape}, expected ({n}, {height * width})")
    cols = {
        "image_id": pa.array(np.asarray(image_id, dtype=np.int64)),
        "split": pa.array([split] * n, pa.string()),
        "label": pa.array(np.asarray(label, dtype=np.int32)),
        "pred": pa.array(np.full(n, -1, np.int32) if pred is None else np.asarray(pred, dtype=np.int32)),
        "confidence": pa.array(np.full(n, np.nan, np.float32) if confidence is None else np.asarray(confidence, dtype=np.float32)),
        "height": pa.array(np.full(n, height, np.int32)),
        "width": pa.array(np.full(n, width, np.int32)),
        "order": pa.FixedSizeListArray.from_arrays(order_np.reshape(-1), height * width).cast(pa.list_(pa.int32())),
        "curve": (
            pa.nulls(n, pa.list_(pa.float32()))
            if curve is None
            else pa.FixedSizeListArray.from_arrays(curve.detach().cpu().numpy().astype(np.float32).reshape(-1), height * width).cast(pa.list_(pa.float32()))
        ),
        "model": pa.array([model] * n, pa.string()),
        "selector": pa.array([selector] * n, pa.string()),
        "selector_params": pa.array([selector_params] * n, pa.string()),
    }
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    fs, d = _dir(root, model, selector, split)
    fs.create_dir(d, recursive=True)
    first = int(image_id[0]) if n else 0
    name = f"part-{first:09d}-{n}-{uuid.uuid4().hex[:8]}.parquet"
    final = f"{d}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{d}/.tmp-{name}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)  # atomic rename on one file system
    else:
        pq.write_table(table, final, filesystem=fs)  # object-store PUTs appear whole or not at all
    return final


def _part_files(root: str, model: str, selector: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, d = _dir(root, model, selector, split)
    info = fs.get_file_info(d)
    if info.type == pafs.FileType.NotFound:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(d))
    return fs, sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def _read_table(root: str, model: str, selector: str, split: str, columns: list[str] | None = None) -> pa.Table:
    fs, files = _part_files(root, model, selector, split)
    tables = []
    for f in files:
        schema = pq.read_schema(f, filesystem=fs)
        version = (schema.metadata or {}).get(b"overinterp_schema_version", b"?").decode()
        if version != SCHEMA_VERSION:
            raise StoreError(f"{f} has schema version {version}, this overinterp reads {SCHEMA_VERSION}: rerun selection into a new --out directory")
        if not schema.equals(SCHEMA, check_metadata=False):  # also keeps out Ray's pickled-object columns, which unpickle on read
            names = set(schema.names) | set(SCHEMA.names)
            bad = sorted(n for n in names if n not in schema.names or n not in SCHEMA.names or not schema.field(n).equals(SCHEMA.field(n)))
            raise StoreError(f"{f} carries the store's version but not its columns (differs in {bad}): it was not written by overinterp; remove it, or use a new --out")
        tables.append(pq.read_table(f, filesystem=fs, columns=columns))
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def done_ids(root: str, model: str, selector: str, split: str) -> set[int]:
    """Image ids already stored for this (model, selector, split)."""
    return set(_read_table(root, model, selector, split, ["image_id"]).column("image_id").to_pylist())


def read_selections(root: str, model: str, selector: str, split: str, expect_n: int | None = None) -> Selections:
    """Read all rows of one (model, selector, split), validated and sorted by image id.

    Args:
        expect_n: if given, the ids must be exactly 0..expect_n-1 (no gaps, no duplicates).
    """
    t = _read_table(root, model, selector, split)
    if t.num_rows == 0:
        raise StoreError(f"no selections stored for model={model} selector={selector} split={split} under {root}")
    ids = t.column("image_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise StoreError(f"duplicate image ids in {root}/{model}/{selector}/{split}")
    if expect_n is not None and (len(ids) != expect_n or ids.min() != 0 or ids.max() != expect_n - 1):
        missing = sorted(set(range(expect_n)) - set(ids.tolist()))[:5]
        raise StoreError(f"{root}/{model}/{selector}/{split} holds {len(ids)} of {expect_n} images (missing e.g. {missing}): rerun the selection stage")
    t = t.take(pa.array(np.argsort(ids, kind="stable")))
    h, w = int(t.column("height")[0].as_py()), int(t.column("width")[0].as_py())
    order = torch.from_numpy(np.stack(t.column("order").to_numpy(zero_copy_only=False)).astype(np.int64)).view(-1, h * w)
    curve_col = t.column("curve")
    curve = None
    if curve_col.null_count == 0:
        curve = torch.from_numpy(np.stack(curve_col.to_numpy(zero_copy_only=False)).astype(np.float32)).view(-1, h * w)
    return Selections(
        image_id=t.column("image_id").to_numpy().astype(np.int64),
        label=t.column("label").to_numpy().astype(np.int64),
        pred=t.column("pred").to_numpy().astype(np.int64),
        confidence=torch.from_numpy(t.column("confidence").to_numpy().astype(np.float32)),
        order=order,
        curve=curve,
        height=h,
        width=w,
    )

