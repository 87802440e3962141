"""Reading and writing shards: atomic writes, shard listing, validated reads, and the overlap rule.

Files are written atomically (a temporary name, then a rename on local disks; object stores publish
a PUT whole), so a crash never leaves a partial shard. Every shard is checked against the schema
(overinterp.store.format) before its rows are read.

Readers tolerate overlap left by older stores: rows of one image id that agree are kept once, with
one warning; rows that disagree stop the read with both files named and the command that repairs
the store (overinterp.store.check). `raw_image_ids` reads the id column of every shard with no such
de-duplication, for checks that must see a repeat.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from overinterp import fs as files
from overinterp.store.format import (
    READABLE_VERSIONS,
    REPAIR_HINT,
    SCHEMA,
    SCHEMA_VERSION,
    V1_SCHEMA,
    StoreError,
    decode_order,
    encode_steps,
    from_v1,
    list_array,
    selection_dir,
    shard_name,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CURVE_TOLERANCE = 1e-5  # rows of one image agree if their curves differ by less (another batch's float noise)


@dataclass
class Selections:
    """Rows of one (model, selector, split) read back as tensors, sorted by image id."""

    image_id: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64
    pred: np.ndarray  # (N,) int64
    confidence: torch.Tensor  # (N,) float32
    order: torch.Tensor  # (N, HW) int64, earliest removal first
    curve: torch.Tensor | None  # (N, HW) float32 p(c) after each removal, or None for model-free selectors
    height: int
    width: int
    forward_passes: np.ndarray | None = None  # (N,) int64 images evaluated per row

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


def write_rows(
    root: str,
    *,
    model: str,
    selector: str,
    selector_params: str,
    split: str,
    image_id: np.ndarray,
    label: np.ndarray,
    height: int,
    width: int,
    order: torch.Tensor | None = None,
    step_sizes: tuple[int, ...] | None = None,
    curve: torch.Tensor | None = None,
    pred: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
    forward_passes: np.ndarray | int = 0,
) -> str:
    """Write one shard atomically under its content name; returns its path.

    Args:
        order: (N, HW) removal order on any device; None for selectors whose order the reader
            regenerates from the parameters (the seeded random baseline).
        step_sizes: pixels removed per step (default: one per step); within a step `order` must
            list pixels by ascending id.
        curve: (N, HW) p(c) after each removal (constant within a step), or None.
        forward_passes: images evaluated per row (an int is shared by all rows).
    """
    n = len(image_id)
    hw = height * width
    steps_col = pa.nulls(n, pa.list_(pa.uint32()))
    curve_col = pa.nulls(n, pa.list_(pa.float32()))
    if order is not None:
        order_np = order.detach().cpu().numpy().astype(np.int64)
        if order_np.shape != (n, hw):
            raise StoreError(f"order has shape {order_np.shape}, expected ({n}, {hw})")
        sizes = tuple(step_sizes) if step_sizes else (1,) * hw
        steps_col = list_array(encode_steps(order_np, sizes), pa.uint32())
        if curve is not None:
            last = np.cumsum(sizes) - 1  # position of each step's last removal
            curve_col = list_array(curve.detach().cpu().numpy().astype(np.float32)[:, last], pa.float32())
    elif curve is not None:
        raise StoreError("a curve needs the order it was measured along")
    cols = {
        "image_id": pa.array(np.asarray(image_id, dtype=np.int64)),
        "split": pa.array([split] * n, pa.string()),
        "label": pa.array(np.asarray(label, dtype=np.int32)),
        "pred": pa.array(np.full(n, -1, np.int32) if pred is None else np.asarray(pred, dtype=np.int32)),
        "confidence": pa.array(np.full(n, np.nan, np.float32) if confidence is None else np.asarray(confidence, dtype=np.float32)),
        "height": pa.array(np.full(n, height, np.int32)),
        "width": pa.array(np.full(n, width, np.int32)),
        "removal_step": steps_col,
        "curve": curve_col,
        "forward_passes": pa.array(np.broadcast_to(np.asarray(forward_passes, dtype=np.int64), (n,))),
        "model": pa.array([model] * n, pa.string()),
        "selector": pa.array([selector] * n, pa.string()),
        "selector_params": pa.array([selector_params] * n, pa.string()),
    }
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    fs, d = files.resolve(selection_dir(root, model, selector, split))
    fs.create_dir(d, recursive=True)
    final = f"{d}/{shard_name(model, selector, split, cols['image_id'].to_numpy())}"
    write_table_atomic(fs, final, table)
    return final


def write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """A shard appears whole or not at all; a second writer of the same path replaces it whole."""
    if isinstance(fs, pafs.LocalFileSystem):
        d, name = path.rsplit("/", 1)
        tmp = f"{d}/.tmp-{np.random.default_rng().integers(1 << 62):x}-{name}"  # one per writer: concurrent retries never share it
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        fs.move(tmp, path)  # atomic rename on one file system
    else:
        pq.write_table(table, path, filesystem=fs, compression="zstd")  # object-store PUTs appear whole or not at all


# --- reading -----------------------------------------------------------------------------------


def shard_files(root: str, model: str, selector: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, d = files.resolve(selection_dir(root, model, selector, split))
    if fs.get_file_info(d).type == pafs.FileType.NotFound:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(d))
    return fs, sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def _out_of(root: str) -> str:
    """The run's --out for a selections root (<out>/selections), for messages."""
    return root.rstrip("/").removesuffix("/selections") or root


def read_shard(fs: pafs.FileSystem, path: str, columns: list[str] | None = None, out: str = "OUT") -> pa.Table:
    """One shard as a version-2 table (version-1 shards converted); StoreError naming the file."""
    hint = REPAIR_HINT.format(out=out)
    try:
        shard = pq.ParquetFile(path, filesystem=fs)  # one open for the footer and the columns
        schema = shard.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"{path} is not a readable Parquet shard ({str(e).splitlines()[0]}): {hint} to quarantine it, then rerun to redo its images") from e
    version = (schema.metadata or {}).get(b"overinterp_schema_version", b"?").decode()
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path} has schema version {version}, this overinterp reads {', '.join(READABLE_VERSIONS)}: "
                         f"{hint} to quarantine it, or write to a new --out directory")
    expected = SCHEMA if version == SCHEMA_VERSION else V1_SCHEMA
    if not schema.equals(expected, check_metadata=False):  # also keeps out Ray's pickled-object columns, which unpickle on read
        names = set(schema.names) | set(expected.names)
        bad = sorted(n for n in names if n not in schema.names or n not in expected.names or not schema.field(n).equals(expected.field(n)))
        raise StoreError(f"{path} carries the store's version but not its columns (differs in {bad}): it was not written by overinterp; "
                         f"{hint} to quarantine it, or use a new --out")
    want = None if version == "1" else columns  # version-1 shards are small: converted whole
    try:
        table = shard.read(columns=want)
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"{path} could not be read ({str(e).splitlines()[0]}): {hint} to quarantine it, then rerun to redo its images") from e
    if version == "1":
        table = from_v1(table)
    return table.select(columns) if columns is not None else table.select(SCHEMA.names)


@dataclass
class Overlap:
    """Image ids stored more than once in one (model, selector, split)."""

    identical: int  # extra rows that repeat another row of the same image
    conflicts: list[tuple[int, str, str]]  # (image id, file, other file) whose rows disagree


def _rows_agree(a: dict, b: dict) -> bool:
    if a["label"] != b["label"] or a["pred"] != b["pred"] or a["removal_step"] != b["removal_step"]:
        return False
    if not np.allclose(np.float32(a["confidence"]), np.float32(b["confidence"]), atol=CURVE_TOLERANCE, equal_nan=True):
        return False
    if (a["curve"] is None) != (b["curve"] is None):
        return False
    return a["curve"] is None or (len(a["curve"]) == len(b["curve"]) and np.allclose(a["curve"], b["curve"], atol=CURVE_TOLERANCE))


def find_overlap(tables: list[pa.Table], paths: list[str]) -> tuple[pa.Table, np.ndarray, np.ndarray, Overlap]:
    """The shards' rows as one table, the (rows,) index of each row's shard in `paths`, the rows to
    keep (first row of each image id) and what the repeats were."""
    table = pa.concat_tables(tables)
    file_of_row = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    ids = table.column("image_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    keep = order[first]
    identical, conflicts = 0, []
    repeats = order[~first]
    if len(repeats):
        first_row = dict(zip(ids[keep].tolist(), keep.tolist()))
        cols = ["label", "pred", "confidence", "removal_step", "curve"]
        for r in repeats.tolist():
            k = first_row[int(ids[r])]
            a, b = ({c: table.column(c)[i].as_py() for c in cols} for i in (k, r))
            if _rows_agree(a, b):
                identical += 1
            else:
                conflicts.append((int(ids[r]), paths[file_of_row[k]], paths[file_of_row[r]]))
    return table, file_of_row, np.sort(keep), Overlap(identical, conflicts)


_WARNED: set[str] = set()


def _read_table(root: str, model: str, selector: str, split: str, only_ids: np.ndarray | None = None) -> pa.Table:
    """All rows (or those of `only_ids`, filtered shard by shard so the rest never accumulate), one
    per image id; overlap handled as the module docstring says."""
    fs, paths = shard_files(root, model, selector, split)
    out = _out_of(root)
    tables = [read_shard(fs, p, None, out) for p in paths]
    if only_ids is not None:
        wanted = pa.array(np.asarray(only_ids, dtype=np.int64))
        tables = [t.filter(pc.is_in(t.column("image_id"), value_set=wanted)) for t in tables]
    if not tables:
        return SCHEMA.empty_table()
    table, _, keep, overlap = find_overlap(tables, paths)
    if overlap.conflicts:
        image_id, a, b = overlap.conflicts[0]
        raise StoreError(f"image {image_id} has different rows in {a} and {b} ({len(overlap.conflicts)} such images): "
                         f"{REPAIR_HINT.format(out=out)} (it keeps the newest row and quarantines the rest)")
    where = selection_dir(root, model, selector, split)
    if overlap.identical and where not in _WARNED:
        _WARNED.add(where)
        log.warning("%s: %d repeated rows (identical; an older store's retries): keeping one of each; %s rewrites them",
                    where, overlap.identical, REPAIR_HINT.format(out=out))
    return table.take(pa.array(keep)) if len(keep) != table.num_rows else table


READ_THREADS = 8  # shards read at once: pyarrow releases the GIL, and on object stores each read is a round trip


def raw_image_ids(root: str, model: str, selector: str, split: str) -> np.ndarray:
    """(rows,) int64 image id of every row in every shard of one (model, selector, split), in
    shard-file order, repeats included: an image stored twice appears twice (read_selections and
    done_ids keep one). Reads the id column only; empty when nothing is stored."""
    fs, paths = shard_files(root, model, selector, split)
    out = _out_of(root)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        # a copy: a view would keep each shard's Arrow buffers alive (~4 KB a shard, 150 MB at 40,000 shards)
        ids = list(pool.map(lambda p: read_shard(fs, p, ["image_id"], out).column("image_id").to_numpy().copy(), paths))
    return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)


def stored_rows(root: str, model: str, selector: str, split: str) -> int:
    """Rows stored for one (model, selector, split), from the shards' Parquet footers (no column
    is read; a repeat of an image counts twice). 0 when nothing is stored; a shard whose footer
    does not read counts 0 (the validated reads name it, with the repair command)."""
    fs, paths = shard_files(root, model, selector, split)

    def rows(path: str) -> int:
        try:
            return pq.read_metadata(path, filesystem=fs).num_rows
        except (OSError, pa.ArrowInvalid):
            return 0

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return sum(pool.map(rows, paths))


def done_ids(root: str, model: str, selector: str, split: str) -> np.ndarray:
    """(S,) sorted unique int64 ids already stored for this (model, selector, split), from the id
    column only (8 bytes an image: ImageNet's 1.28M train ids are 10 MB; test membership with np.isin)."""
    return np.unique(raw_image_ids(root, model, selector, split))


def stored_mask(ids: np.ndarray, done: np.ndarray) -> np.ndarray:
    """(B,) bool: which of `ids` are in `done` (sorted, as done_ids returns). A binary search per id,
    O(B log S): np.isin would sort the 1.28M stored ids again for every batch of 64."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(done):
        return np.zeros(len(ids), dtype=bool)
    return done[np.minimum(np.searchsorted(done, ids), len(done) - 1)] == ids


def stored_params(table: pa.Table) -> dict:
    """The selector's parameters of a selection's rows (one selection: the same on every row)."""
    return json.loads(table.column("selector_params")[0].as_py())


def read_selections(root: str, model: str, selector: str, split: str, expect_n: int | None = None,
                    expect_ids: np.ndarray | None = None, only_ids: np.ndarray | None = None) -> Selections:
    """Read the rows of one (model, selector, split), validated and sorted by image id.

    Args:
        expect_n: if given, the ids must be exactly 0..expect_n-1 (no gaps).
        expect_ids: if given, the ids must be exactly these.
        only_ids: if given, read only these images' rows (each must be stored): a sample of a split
            too big to hold (the other rows are dropped shard by shard).
    """
    import torch  # here, not at the top: Ray Data's decoding workers import the store and need no torch

    t = _read_table(root, model, selector, split, only_ids)
    if only_ids is not None:
        expect_ids = np.asarray(only_ids)
    where = selection_dir(root, model, selector, split)
    if t.num_rows == 0:
        raise StoreError(f"no selections stored for model={model} selector={selector} split={split} under {root}")
    ids = t.column("image_id").to_numpy()
    if expect_n is not None:
        expect_ids = np.arange(expect_n)
    if expect_ids is not None and (len(ids) != len(expect_ids) or not np.array_equal(np.sort(ids), np.sort(expect_ids))):
        missing = np.setdiff1d(expect_ids, ids)[:5].tolist()
        raise StoreError(f"{where} holds {len(ids)} of {len(expect_ids)} images (missing e.g. {missing}): rerun the selection stage")
    t = t.take(pa.array(np.argsort(ids, kind="stable")))
    ids = t.column("image_id").to_numpy().astype(np.int64)
    h, w = int(t.column("height")[0].as_py()), int(t.column("width")[0].as_py())
    steps_col = t.column("removal_step")
    if steps_col.null_count == 0:
        steps = np.stack(steps_col.to_numpy(zero_copy_only=False)).reshape(-1, h * w)
        order_np = decode_order(steps)
    elif steps_col.null_count == t.num_rows and selector.startswith("random"):
        from overinterp.selection import random_order

        steps = None
        order_np = random_order(ids, h * w, int(stored_params(t)["seed"]), split).numpy()
    else:
        raise StoreError(f"{where}: rows without a removal order for selector {selector}: {REPAIR_HINT.format(out=_out_of(root))}")
    curve = None
    curve_col = t.column("curve")
    if curve_col.null_count == 0 and steps is not None:
        per_step = curve_col.to_numpy(zero_copy_only=False)
        # p(c) after each removal = p(c) after the step that removed it, in removal order
        step_in_order = np.take_along_axis(steps, order_np, axis=1)
        curve = torch.from_numpy(np.stack([c[s] for c, s in zip(per_step, step_in_order)]).astype(np.float32))
    return Selections(
        image_id=ids,
        label=t.column("label").to_numpy().astype(np.int64),
        pred=t.column("pred").to_numpy().astype(np.int64),
        confidence=torch.from_numpy(t.column("confidence").to_numpy().astype(np.float32)),
        order=torch.from_numpy(order_np),
        curve=curve,
        height=h,
        width=w,
        forward_passes=t.column("forward_passes").to_numpy().astype(np.int64),
    )


def validate_shards(root: str) -> None:
    """Read every shard's footer under a local selections root (no data): a corrupt or foreign
    file stops the run before any work, naming the file. Object-store roots are checked when each
    shard is read (a footer GET per shard would be slow there)."""
    if files.is_uri(root):
        return
    for model, selector, split in list_selections(root):
        fsys, paths = shard_files(root, model, selector, split)
        for p in paths:
            read_shard(fsys, p, ["image_id"], _out_of(root))


def list_selections(root: str) -> list[tuple[str, str, str]]:
    """Every (model, selector, split) folder under a selections root."""
    fs, base = files.resolve(root)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.Directory:
            rel = info.path[len(base):].strip("/").split("/")
            if len(rel) == 3:
                found.append(tuple(rel))
    return sorted(found)

