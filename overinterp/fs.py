"""Files on a local disk or an object store, by path or URI (s3://bucket/prefix, gs://…, file://…).

Every output of a run (checkpoints, results, summaries) goes through here so `--out` can be shared
storage on a cluster. Writes are atomic: a temporary name then a rename on file systems, a single
PUT on object stores — a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path within it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if is_uri(root) else os.path.join(root, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{p.rsplit('/', 1)[1]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, p)
    else:
        with fs.open_output_stream(p) as f:
            f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str):
    return json.loads(read_bytes(path))
