"""What a shard is: the pyarrow schema and its versions, where a shard lives and what it is called,
and how a removal order is encoded in it. No file I/O here (that is overinterp.store.io).

Layout under a root (a local path or any URI pyarrow understands, e.g. s3://bucket/prefix):

    <root>/<model>/<selector tag>/<split>/part-<content id>.parquet

A shard's name follows from what it holds: a hash of (model, selector, split) and its sorted image
ids. A task that Ray retries after a lost worker therefore rewrites its own shard instead of adding
a second copy.

Rows are compact (schema version 2): the step at which each pixel was removed and p(c) after each
step, not a per-pixel order and curve. A 299-px Batched Gradient SIS row (k = 100, 895 steps) is
~117 KB on disk against ~715 KB in version 1. The order is rebuilt on read as the pixels sorted by
step, ascending pixel id within a step (the selectors emit that canonical order, so the round trip
is exact). Parquet has no 16-bit physical type: steps are declared uint32, and the dictionary
encoding pyarrow applies stores them in ~log2(steps) bits each, the same bytes a uint16 column
takes (measured: 116.9 KB per 299-px row either way). Version-1 shards are converted on read,
losslessly (`from_v1`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa

from overinterp import fs as files

SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # stable id within its split
        pa.field("split", pa.string(), nullable=False),  # "train" | "test"
        pa.field("label", pa.int32(), nullable=False),  # true class
        pa.field("pred", pa.int32(), nullable=False),  # class c explained (predicted on the full image); -1 for model-free selectors
        pa.field("confidence", pa.float32(), nullable=False),  # p(c) on the full image; NaN for model-free selectors
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        # (HW,) step at which each pixel (row-major id y*W+x) was removed; null: the order is a
        # function of the selector's parameters and the image id (the seeded random baseline)
        pa.field("removal_step", pa.list_(pa.uint32()), nullable=True),
        pa.field("curve", pa.list_(pa.float32()), nullable=True),  # (steps,) p(c) after each step; null for model-free selectors
        pa.field("forward_passes", pa.int64(), nullable=False),  # images the model evaluated for this row
        pa.field("model", pa.string(), nullable=False),  # model tag, e.g. digits_cnn-s0, or "none"
        pa.field("selector", pa.string(), nullable=False),  # selector tag, e.g. backselect, random-seed0
        pa.field("selector_params", pa.string(), nullable=False),  # JSON of the selector's parameters
    ],
    metadata={"overinterp_schema_version": SCHEMA_VERSION},
)
# version 1 stored the order and a per-pixel curve; read and converted by from_v1
V1_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=f.nullable) for f in SCHEMA if f.name not in ("removal_step", "curve", "forward_passes", "model", "selector", "selector_params")]
                      + [pa.field("order", pa.list_(pa.int32()), nullable=False), pa.field("curve", pa.list_(pa.float32()), nullable=True)]
                      + [SCHEMA.field(n) for n in ("model", "selector", "selector_params")])
REPAIR_HINT = "run `overinterp store repair --out {out}`"


class StoreError(RuntimeError):
    """A store file that is not ours, unreadable, from an unknown schema version, or inconsistent."""


def selection_dir(root: str, model: str, selector: str, split: str) -> str:
    """The folder of one (model, selector, split) under a selections root."""
    return files.join(root, model, selector, split)


def shard_name(model: str, selector: str, split: str, image_ids: Iterable[int]) -> str:
    """part-<16 hex>.parquet, a function of what the shard holds, so a retried task overwrites it."""
    ids = np.sort(np.asarray(list(image_ids), dtype=np.int64))
    h = hashlib.sha1(f"{model}/{selector}/{split}:".encode())
    h.update(ids.astype("<i8").tobytes())
    return f"part-{h.hexdigest()[:16]}.parquet"


# --- compact encoding --------------------------------------------------------------------------


def encode_steps(order: np.ndarray, step_sizes: tuple[int, ...]) -> np.ndarray:
    """(N, HW) removal order + step sizes -> (N, HW) uint32 step of each pixel.

    Raises StoreError if pixels removed in one step are not listed by ascending pixel id (the
    canonical order, without which the round trip would not be exact).
    """
    n, hw = order.shape
    step_of_position = np.repeat(np.arange(len(step_sizes), dtype=np.uint32), step_sizes)  # (removed,)
    if len(step_of_position) != hw:
        raise StoreError(f"step sizes sum to {len(step_of_position)}, the images have {hw} pixels")
    same_step = step_of_position[1:] == step_of_position[:-1]
    if (same_step & (order[:, 1:] <= order[:, :-1])).any():
        raise StoreError("pixels removed in one step must be listed by ascending pixel id")
    steps = np.empty((n, hw), dtype=np.uint32)
    np.put_along_axis(steps, order, np.broadcast_to(step_of_position, (n, hw)), axis=1)
    return steps


def decode_order(steps: np.ndarray) -> np.ndarray:
    """(N, HW) step of each pixel -> (N, HW) int64 order: by step, then by pixel id."""
    return np.argsort(steps, axis=1, kind="stable").astype(np.int64)


def steps_to_keep(steps: np.ndarray, fraction: float) -> np.ndarray:
    """(N, HW) step of each pixel -> (N, HW) bool keep-mask of the last ceil(fraction * HW) removed.

    The same pixels as keep_mask(decode_order(steps), fraction), without building the order twice
    where a caller streams rows (the ImageNet trainer).
    """
    from overinterp.selection import n_keep

    n, hw = steps.shape
    k = n_keep(fraction, hw)
    order = decode_order(steps)
    keep = np.zeros((n, hw), dtype=bool)
    np.put_along_axis(keep, order[:, hw - k :], True, axis=1)
    return keep


def list_array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """(N, W) array -> an Arrow list column of N rows of W values each."""
    n, width = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), typ), width).cast(pa.list_(typ))


def from_v1(t: pa.Table) -> pa.Table:
    """A version-1 table (the order and a per-pixel curve) as version-2 columns: each removal its own step."""
    n = t.num_rows
    out = {name: t.column(name) for name in t.column_names if name in SCHEMA.names}
    if "order" in t.column_names:
        order = np.stack(t.column("order").to_numpy(zero_copy_only=False)).astype(np.int64) if n else np.zeros((0, 0), np.int64)
        hw = order.shape[1] if n else 0
        out["removal_step"] = list_array(encode_steps(order, (1,) * hw), pa.uint32()) if n else pa.array([], pa.list_(pa.uint32()))
    if "curve" in t.column_names:
        out["curve"] = t.column("curve").cast(pa.list_(pa.float32()))
    if "forward_passes" not in out:
        out["forward_passes"] = pa.array(np.zeros(n, np.int64))
    names = [c for c in SCHEMA.names if c in out]
    return pa.table({c: out[c] for c in names}, schema=pa.schema([SCHEMA.field(c) for c in names]))
