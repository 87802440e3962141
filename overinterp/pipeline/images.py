"""Labelled images streamed with Ray Data from a local path or s3://, decoded on the workers.

Two source layouts, chosen by what the path holds:
- an ImageFolder split: <path>/<class>/<image> (JPEG, PNG, ...); labels are the index of the class
  folder in the sorted class list of the *train* source, so train and val agree;
- Parquet of encoded images: columns `image` (encoded bytes), `label` (int) and optionally
  `image_id` (int64); a file or a folder of files.

Every row leaves as {image_id: int64, label: int64, image: uint8 (3, S, S), path: str, error: str},
resized and centre-cropped like `overinterp.data.resize_center_crop`. Image ids are stable across
runs (the given `image_id`, else a hash of the image's path within the source or of its bytes),
which is what lets a rerun skip images already in the store. `path` names the image for people:
its path within an ImageFolder split, or "<source> image_id <id>" for Parquet.

Bad files. A folder's layout is checked by listing it before anything is decoded (a class folder
without images, a class the train split lacks, an image outside a class folder: SourceError).
Decoding runs in `map_batches` on the workers, which return one table per batch, so a file that
does not decode still yields a row: a zero image, and the reason in `error` ('' for good rows).
Selection counts the bad rows of each split and stores none of them (select_stage); the training
and test streams drop them with `drop_bad` (an Arrow filter per block). strict=True makes the
first bad file a SourceError naming it.
Rejected: raising in the worker by default (one bad JPEG kills an ImageNet job), filtering in the
worker (loses the record: a silent skip), and an actor collecting errors (another moving part,
and a retried task would report its files twice).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from overinterp import fs, store
from overinterp.data import DataError, HIDDEN_PREFIXES, IMAGE_EXTENSIONS, decode_failure, decode_image, is_image_name
from overinterp.pipeline.terminal import log


class SourceError(DataError):
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
    return any(e.type == pafs.FileType.File and e.base_name.endswith(".parquet") for e in _entries(path))


def list_classes(path: str) -> list[str]:
    """Sorted class folder names of an ImageFolder split (names starting with . or _ are skipped, as Ray Data does)."""
    entries = _entries(path)
    if entries and entries[0].type == pafs.FileType.File and entries[0].path == fs.resolve(path)[1]:  # the path itself
        raise SourceError(f"{path} is a file, not a source: give an ImageFolder split (a folder, <path>/<class>/<image>) "
                          "or Parquet of encoded images (a .parquet file or a folder of them)")
    classes = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and not e.base_name.startswith(HIDDEN_PREFIXES))
    if not classes:
        raise SourceError(f"{path} has no class sub-folders: expected {path}/<class>/<image>")
    if len(classes) == 1:
        raise SourceError(f"{path} has one class folder ({classes[0]}): a classifier needs at least 2, {path}/<class>/<image> for each")
    return classes


@dataclass(frozen=True)
class FolderListing:
    """What one listing of a folder tells: image files per top-level folder (hidden ones left out),
    image files lying at the top, and a digest of every file's relative path and size in path order
    (16 hex digits of sha256: the source's identity in config.json; no file is read)."""

    images: dict[str, int]
    loose: tuple[str, ...]
    digest: str


# path -> this process's listing of it: a run forgets older listings when it starts (driver.prepare),
# lists each folder once, then counts, checks, digests and every dataset it builds use that listing
_LISTINGS: dict[str, FolderListing] = {}


def forget_listings() -> None:
    """Drop the remembered listings: the next list_folder of each path lists it again."""
    _LISTINGS.clear()


def list_folder(path: str) -> FolderListing:
    """One recursive listing per top-level entry (an ImageFolder class), remembered for the process:
    the driver holds one class's entries at a time (~1,300 on ImageNet), never the split's 1.28M."""
    if path in _LISTINGS:
        return _LISTINGS[path]
    f, p = fs.resolve(path)
    h, images, loose = hashlib.sha256(), {}, []

    def add(files):
        for e in sorted(files, key=lambda e: e.path):
            h.update(f"{e.path[len(p):]}:{e.size}".encode())

    # a folder's files sort after its name + "/", as they would in one sorted listing of full paths
    for e in sorted(_entries(path), key=lambda e: e.path + ("/" if e.type == pafs.FileType.Directory else "")):
        if e.type == pafs.FileType.Directory:
            files = [x for x in f.get_file_info(pafs.FileSelector(e.path, recursive=True)) if x.type == pafs.FileType.File]
            add(files)
            if not e.base_name.startswith(HIDDEN_PREFIXES):
                images[e.base_name] = sum(is_image_name(x.base_name) for x in files)
        elif e.type == pafs.FileType.File:
            add([e])
            if is_image_name(e.base_name) and not e.base_name.startswith(HIDDEN_PREFIXES):
                loose.append(e.base_name)
    _LISTINGS[path] = FolderListing(images, tuple(loose), h.hexdigest()[:16])
    return _LISTINGS[path]


def check_folder(path: str, classes: list[str]) -> dict[str, int]:
    """Image files per class folder of an ImageFolder split, from its listing (list_folder).

    Raises SourceError naming the folder or file for: a class folder without image files, a class
    folder not in `classes` (the train split's), an image file outside a class folder.
    """
    listing = list_folder(path)
    if listing.loose:
        raise SourceError(f"{path}/{listing.loose[0]}: image outside a class folder: move it into {path}/<class>/, or remove it")
    if not listing.images:
        raise SourceError(f"{path} has no class sub-folders: expected {path}/<class>/<image>")
    for cls, n in sorted(listing.images.items()):
        if cls not in classes:
            raise SourceError(f"{path}/{cls}: class folder {cls!r} is not among the train classes: remove it, or add it to the train split")
        if n == 0:
            raise SourceError(f"{path}/{cls} holds no images ({', '.join(IMAGE_EXTENSIONS)}): remove it, or add images")
    return dict(listing.images)


def _decode_rows(blobs, names: list[str], size: int, strict: bool) -> dict:
    """Decode each blob; a failure gives a zero image and its reason (strict: a SourceError)."""
    images, errors = [], []
    for b, name in zip(blobs, names):
        try:
            images.append(decode_image(bytes(b), size))
            errors.append("")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
            if strict:
                raise SourceError(f"{name}: cannot decode ({decode_failure(e)}): remove the file, or drop --strict to skip it") from e
            images.append(np.zeros((3, size, size), dtype=np.uint8))
            errors.append(decode_failure(e))
    return {"image": np.stack(images), "error": np.array(errors, dtype=object)}


def _index_folder(batch: dict, root: str, classes: list[str]) -> dict:
    """Encoded folder rows -> image_id (hash of the path within the split), label, path, bytes."""
    index = {c: i for i, c in enumerate(classes)}
    rel = [p[len(root):].lstrip("/") if p.startswith(root) else p for p in batch["path"]]
    folders = [r.split("/")[0] for r in rel]
    new = sorted(set(folders) - index.keys())  # check_folder listed the split: only a folder added since
    if new:
        raise SourceError(f"{root}: class folder {new[0]!r} appeared after the split was listed: rerun")
    return {
        "image_id": np.array([stable_id(r.encode()) for r in rel], dtype=np.int64),
        "label": np.array([index[c] for c in folders], dtype=np.int64),
        "path": np.array(rel, dtype=object),
        "encoded": batch["bytes"],
    }


def _index_parquet(batch: dict, source: str = "") -> dict:
    """Encoded Parquet rows -> image_id (given, else a hash of the bytes), label, path, bytes."""
    ids = batch.get("image_id")
    ids = np.asarray(ids, dtype=np.int64) if ids is not None else np.array([stable_id(bytes(b)) for b in batch["image"]], dtype=np.int64)
    return {
        "image_id": ids,
        "label": np.asarray(batch["label"], dtype=np.int64),
        "path": np.array([f"{source} image_id {i}" for i in ids], dtype=object),
        "encoded": batch["image"],
    }


def decode_batch(batch: dict, size: int, strict: bool = False, keep_columns: tuple[str, ...] = (), root: str = "",
                 skip_ids: Optional[np.ndarray] = None, job: Optional[int] = None) -> dict:
    """Encoded rows (image_id, label, path, encoded) -> decoded rows (image uint8 (B, 3, S, S), error).

    keep_columns: other columns carried through (the training stream's keep-masks).
    root: a folder source's split, prefixed to paths in strict errors so they name the file whole.
    skip_ids: (S,) sorted int64 ids dropped before decoding (a rerun's images already selected).
    job: where given, a `job` column of this value (the selection job the rows are read for).
    """
    if skip_ids is not None and len(skip_ids):
        keep = ~store.stored_mask(batch["image_id"], skip_ids)
        batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    names = [f"{root}/{p}" if root else p for p in batch["path"]]
    tag = {} if job is None else {"job": np.full(len(names), job, dtype=np.int64)}
    return {"image_id": batch["image_id"], "label": batch["label"], "path": batch["path"],
            **{c: batch[c] for c in keep_columns}, **tag, **_decode_rows(batch["encoded"], names, size, strict)}


# Training rows carry their keep-mask in this column: (B, ceil(HW / 8)) uint8, bit-packed (np.packbits
# order). The stream that joins them (pipeline/train_stream.py) runs these two functions on the
# decoding workers, which is why they live here, in a module that imports no torch.
MASK_COLUMN = "keep"


def look_up_keep(batch: dict, table: list) -> dict:
    """Encoded rows -> the rows with a stored keep-mask, each with it (an inner join by image_id).

    table: [ObjectRef of train_stream.mask_table's (ids, packed keep)], read zero-copy from the object store.
    """
    ids, keep = ray.get(table[0])  # ids: never empty (mask_table of a selection with no shards refuses)
    want = np.asarray(batch["image_id"])
    at = np.searchsorted(ids, want).clip(max=len(ids) - 1)
    hit = ids[at] == want
    return {**{k: np.asarray(v)[hit] for k, v in batch.items()}, MASK_COLUMN: keep[at[hit]]}


def keep_all(batch: dict, hw: int) -> dict:
    """Full images: every pixel kept, packed like a stored keep-mask."""
    n = len(batch["image_id"])
    return {**batch, MASK_COLUMN: np.packbits(np.ones((n, hw), dtype=bool), axis=1)}


# Ray Data has two Parquet readers. Its default (V2) lists the files in a task and reads their
# footers on an actor: new processes at every read (~3 CPU-s on 2 cores). V1 lists in the process
# that builds the dataset and samples a file or two in a pooled worker. A streamed run reads Parquet
# ~10 times (selection, each trial's two streams, the summary): with V1 for every read a 100-image
# run took 42 s against 53 s and a 100,000-image run 171 s against 196 s. A bigger read is another
# matter: V1 splits each file's read into many small decoding tasks, and 200,000 images read and
# decoded with one CPU held (as a trial holds it) took 42.8 s against V2's 35.6 s (BENCHMARKS.md,
# "Parquet reads by their size"). So reads of up to SMALL_READ_IMAGES images take V1, bigger ones V2.
SMALL_READ_IMAGES = 100_000


def read_parquet(paths, images: Optional[int] = None, **kwargs) -> ray.data.Dataset:
    """ray.data.read_parquet with the reader for a read of `images` images (None: not known; Ray's
    default reader, as for a big read)."""
    ctx = ray.data.DataContext.get_current()
    default = ctx.use_datasource_v2  # Ray Data picks the reader when the dataset is built: set it for this call only
    ctx.use_datasource_v2 = default if images is None else images > SMALL_READ_IMAGES
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = default


def check_columns(path: str, types: dict) -> None:
    """SourceError unless a Parquet source's columns ({name: pyarrow type}) hold encoded images and
    integer labels (and integer image ids, where it has them)."""
    missing = {"image", "label"} - set(types)
    if missing:
        raise SourceError(f"{path}: Parquet sources need columns image (encoded bytes) and label; missing {sorted(missing)}")
    expected = {"image": ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
                "label": ("an integer", pa.types.is_integer), "image_id": ("an integer", pa.types.is_integer)}
    wrong = [f"{c} is {types[c]}, not {kind}" for c, (kind, ok) in expected.items() if c in types and not ok(types[c])]
    if wrong:
        raise SourceError(f"{path}: {'; '.join(wrong)}: write encoded image bytes and integer labels (and image ids)")


FOOTER_THREADS = 16


def parquet_rows(path: str, num_classes: Optional[int] = None, shuffle_buffer: Optional[int] = None) -> int:
    """Rows of a Parquet source, from its files' footers (no image is read). Checks each file on the
    way: that it is Parquet, its columns (check_columns), and that the labels its footer statistics
    record lie in [0, num_classes) (None: only >= 0). SourceError naming the file and the fix.

    shuffle_buffer: where the rows train a model, the images its shuffle buffer holds. Training
    shuffles whole files and that buffer, not the rows of one file, so a file of more rows whose
    labels never fall (sorted by label, or of one class) gets a warning; its label column is read
    for that (8 bytes a row)."""
    f, p = fs.resolve(path)
    info = f.get_file_info(p)
    files = [p] if info.type == pafs.FileType.File else sorted(i.path for i in f.get_file_info(pafs.FileSelector(p, recursive=True))
                                                               if i.base_name.endswith(".parquet"))

    def footer(name: str):
        """(footer, whether its labels never fall), or the error reading it."""
        try:
            meta = pq.read_metadata(name, filesystem=f)
            if not shuffle_buffer or meta.num_rows <= shuffle_buffer or "label" not in meta.schema.names:
                return meta, False
            labels = pq.read_table(name, columns=["label"], filesystem=f).column("label").to_numpy()
            return meta, bool(np.all(labels[1:] >= labels[:-1]))
        except (pa.ArrowInvalid, OSError) as e:
            return e

    rows = 0
    # files are read FOOTER_THREADS at a time (a round trip each on an object store), checked in file order
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        footers = list(pool.map(footer, files))
    for name, read in zip(files, footers):
        if isinstance(read, Exception):
            raise SourceError(f"{name} is not a readable Parquet file ({str(read).strip().splitlines()[0]}): "
                              "give Parquet of encoded images, or remove it") from read
        meta, in_order = read
        schema = meta.schema.to_arrow_schema()
        check_columns(name, dict(zip(schema.names, schema.types)))
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]  # Parquet's leaf columns, not Arrow's fields
        label = leaves.index("label")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(label).statistics
            if stats is None or not stats.has_min_max:
                continue
            if stats.min < 0:
                raise SourceError(f"{name}: labels run from {stats.min}: class labels are 0, 1, 2, ...: fix the labels")
            if num_classes is not None and stats.max >= num_classes:
                raise SourceError(f"{name}: labels run to {stats.max}, beyond the {num_classes} classes (0..{num_classes - 1}): "
                                  f"give --num-classes {stats.max + 1} (the classes of a Parquet source), or fix the labels")
        if in_order:
            log(f"warning: {name} stores its {meta.num_rows:,} rows in label order (or of one class), and training shuffles only "
                f"whole files and {shuffle_buffer:,} images at a time: its batches will hold few classes; write its rows in random order")
        rows += meta.num_rows
    return rows


def read_encoded(path: str, classes: list[str] | None = None, limit: int | None = None, images: int | None = None,
                 shuffle_seed: Optional[int] = None) -> ray.data.Dataset:
    """A Ray Dataset of encoded, labelled images (image_id, label, path, encoded bytes): nothing decoded.

    Args:
        classes: the class order for folder sources (the train split's); None for Parquet.
        limit: keep only the first `limit` images (smoke runs, pilots).
        images: how many images the read yields, where the caller knows (the plan's count): it picks
            the Parquet reader (read_parquet).
        shuffle_seed: read the files in a random order, another on each pass over the dataset, all
            drawn from this seed. Shuffling the files as they are read keeps the read streaming;
            shuffling blocks after it would wait for all of them. With a `limit`, the first images
            in listing order are read and their blocks put in a seeded order each pass (a pilot is
            small: waiting for its blocks costs little).
    """
    shuffle = None if shuffle_seed is None or limit else ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    if is_parquet(path):
        ds = read_parquet(path, images, shuffle=shuffle)
        schema = ds.schema()
        check_columns(path, dict(zip(schema.names, schema.types)))
        ds = _first(ds, limit).map_batches(_index_parquet, fn_kwargs={"source": path}, batch_format="numpy", batch_size=64)
    else:
        if classes is None:
            classes = list_classes(path)
        check_folder(path, classes)  # the layout, before anything is decoded
        _, root = fs.resolve(path)
        exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS]  # Ray Data matches extensions in any case
        ds = _first(ray.data.read_binary_files(path, include_paths=True, file_extensions=exts, shuffle=shuffle), limit)
        ds = ds.map_batches(_index_folder, fn_kwargs={"root": root.rstrip("/"), "classes": classes}, batch_format="numpy", batch_size=64)
    if limit and shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    return ds


def _first(ds: ray.data.Dataset, limit: int | None) -> ray.data.Dataset:
    """The first `limit` rows in file order (None: all). Ray Data's limit takes the rows that arrive
    first unless order is preserved, and selection, training and the summary of a pilot must all
    see the same images; so a limited dataset runs in order (pilots only: it costs parallelism)."""
    if not limit:
        return ds
    ds = ds.limit(limit)
    ds.context.execution_options.preserve_order = True  # this dataset's context: the process default stays
    return ds


def read_images(path: str, image_size: int, classes: list[str] | None = None, limit: int | None = None,
                strict: bool = False, skip_ids: Optional[np.ndarray] = None, images: int | None = None,
                job: Optional[int] = None) -> ray.data.Dataset:
    """A Ray Dataset of decoded, labelled images from an ImageFolder split or encoded Parquet.

    Rows that failed to decode are included (zero image, reason in `error`): count them, and pass
    the Dataset through `drop_bad` before use.
    Same arguments as `read_encoded`; strict: raise SourceError at the first image that does not
    decode (`--strict`); skip_ids: sorted ids left out before decoding; job: a `job` column of this
    value (decode_batch).
    """
    root = "" if is_parquet(path) else fs.resolve(path)[1].rstrip("/")
    ds = read_encoded(path, classes, limit, images).map_batches(decode_batch, fn_kwargs={"size": image_size, "strict": strict, "root": root,
                                                                                 "skip_ids": skip_ids, "job": job},
                                                         batch_format="numpy", batch_size=64)
    if strict:  # a worker's SourceError reaches the driver as itself (Ray Data wraps it by default)
        ds.context.raise_original_map_exception = True  # this Dataset's own copy of the context
    return ds


def _good_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["error"], ""))


def drop_bad(ds: ray.data.Dataset) -> ray.data.Dataset:
    """The rows of a `read_images` Dataset whose image decoded (lazy; an Arrow filter per block)."""
    return ds.map_batches(_good_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
