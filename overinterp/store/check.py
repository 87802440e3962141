"""`overinterp store check|repair`: find and mend what crashes, retries and old versions left in a
store, and the report table the command prints.

check reports, per (model, selector, split): rows, repeated rows (identical, or conflicting), image
ids that other selections of the same split hold and this one lacks, and unreadable files.

repair never deletes data. Unreadable or foreign files move to <out>/quarantine/ (same relative
path). Where an image id has several rows, the row of the most recently written shard is kept; each
shard that loses rows is rewritten to the rows it keeps (under a new content name) and the original
moves to quarantine. New shards are written before originals move, so a crash mid-repair leaves
only identical repeats, which readers tolerate and a second repair removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from overinterp import fs as files
from overinterp.store.format import SCHEMA, StoreError, shard_name
from overinterp.store.io import find_overlap, list_selections, read_shard, shard_files, write_table_atomic

QUARANTINE = "quarantine"


@dataclass
class SelectionReport:
    """One (model, selector, split) as `overinterp store check` sees it."""

    model: str
    selector: str
    split: str
    files: int = 0
    rows: int = 0  # distinct image ids in readable files
    repeated: int = 0  # extra rows identical to another row of the same image
    conflicting: int = 0  # images whose rows disagree
    missing: list[int] = field(default_factory=list)  # ids other selections of the split hold
    unreadable: list[str] = field(default_factory=list)  # file: reason

    @property
    def ok(self) -> bool:
        return not (self.repeated or self.conflicting or self.missing or self.unreadable)


def _load(fs: pafs.FileSystem, paths: list[str], out: str):
    """Readable tables, their paths, and the unreadable paths with reasons."""
    tables, good, bad = [], [], []
    for p in paths:
        try:
            tables.append(read_shard(fs, p, None, out))
            good.append(p)
        except StoreError as e:
            bad.append(f"{p}: {str(e).split(' (')[0].split(': run')[0]}")
    return tables, good, bad


def check_store(out: str) -> list[SelectionReport]:
    """One report per (model, selector, split) under <out>/selections."""
    root = files.join(out, "selections")
    reports, ids_by_key = [], {}
    for model, selector, split in list_selections(root):
        fs, paths = shard_files(root, model, selector, split)
        r = SelectionReport(model, selector, split, files=len(paths))
        tables, good, r.unreadable = _load(fs, paths, out)
        ids = np.zeros(0, np.int64)
        if tables:
            table, _, keep, overlap = find_overlap(tables, good)
            r.repeated, r.conflicting = overlap.identical, len({c[0] for c in overlap.conflicts})
            ids = table.column("image_id").to_numpy()[keep]
        r.rows = len(ids)
        ids_by_key[(model, selector, split)] = ids
        reports.append(r)
    for r in reports:
        union = np.unique(np.concatenate([v for (m, s, sp), v in ids_by_key.items() if sp == r.split]))
        r.missing = np.setdiff1d(union, ids_by_key[(r.model, r.selector, r.split)]).tolist()
    return reports


def _quarantine(fs: pafs.FileSystem, path: str, root: str) -> str:
    """Move a shard of the store at `root` (<out>/selections) to <out>/quarantine/, same relative path."""
    _, root = files.resolve(root)
    dest = root.rstrip("/").rsplit("/", 1)[0] + f"/{QUARANTINE}/" + path[len(root):].lstrip("/")
    fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    fs.move(path, dest)
    return dest


def repair_store(out: str) -> list[str]:
    """Quarantine unreadable files and rewrite overlapping shards to one row per id; returns what it did."""
    root = files.join(out, "selections")
    return [a for model, selector, split in list_selections(root) for a in repair_selection(root, model, selector, split, out)]


def repair_selection(root: str, model: str, selector: str, split: str, out: str = "OUT") -> list[str]:
    """repair_store for one (model, selector, split) of the store at `root`; out: named in messages."""
    actions = []
    fs, paths = shard_files(root, model, selector, split)
    tables, good, bad = _load(fs, paths, out)
    for line in bad:
        path = line.split(": ")[0]
        actions.append(f"quarantined {path} -> {_quarantine(fs, path, root)} ({line[len(path) + 2:]})")
    if not tables:
        return actions
    # newest file first, so the first row of each id (the one find_overlap keeps) is the newest
    mtimes = [fs.get_file_info(p).mtime_ns or 0 for p in good]
    newest_first = sorted(range(len(good)), key=lambda i: (-mtimes[i], good[i]))
    tables, good = [tables[i] for i in newest_first], [good[i] for i in newest_first]
    table, file_of_row, keep, overlap = find_overlap(tables, good)
    if not overlap.identical and not overlap.conflicts:
        return actions
    kept = np.zeros(table.num_rows, dtype=bool)
    kept[keep] = True
    _, d = files.resolve(files.join(root, model, selector, split))
    rewrites = []  # (original, rows it keeps, new name or None)
    for i, path in enumerate(good):
        rows = np.flatnonzero(file_of_row == i)
        own = rows[kept[rows]]
        if len(own) < len(rows):  # a shard that keeps all its rows stays untouched
            new = f"{d}/{shard_name(model, selector, split, table.column('image_id').to_numpy()[own])}" if len(own) else None
            rewrites.append((path, own, new))
    replaced = {path for path, _, _ in rewrites}
    for path, own, new in rewrites:
        if new is not None and new != path and new in replaced and fs.get_file_info(new).type != pafs.FileType.NotFound:
            # a content name can only be taken by a shard of the same ids, itself being replaced
            actions.append(f"quarantined {new} -> {_quarantine(fs, new, root)} (its name is reused)")
            replaced.discard(new)
    for path, own, new in rewrites:
        if new is not None:
            write_table_atomic(fs, new, table.take(pa.array(own)).cast(SCHEMA))
            actions.append(f"rewrote {path} as {new} ({len(own)} rows kept)")
    for path in sorted(replaced):
        if fs.get_file_info(path).type != pafs.FileType.NotFound and path not in {n for _, _, n in rewrites}:
            actions.append(f"quarantined {path} -> {_quarantine(fs, path, root)} (its rows are kept elsewhere)")
    if overlap.conflicts:
        actions.append(f"{model}/{selector}/{split}: {len(overlap.conflicts)} conflicting images kept from the newest shard")
    return actions


def report_table(reports: list[SelectionReport]) -> str:
    lines = ["| model | selector | split | rows | files | repeated | conflicting | missing ids | unreadable files |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        missing = f"{len(r.missing)}" + (f" (e.g. {r.missing[:3]})" if r.missing else "")
        lines.append(f"| {r.model} | {r.selector} | {r.split} | {r.rows} | {r.files} | {r.repeated} | {r.conflicting} | {missing} | {len(r.unreadable)} |")
    for r in reports:
        lines.extend(f"unreadable: {u}" for u in r.unreadable)
    return "\n".join(lines)
