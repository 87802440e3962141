"""Files on a local disk or an object store, by path or URI (s3://bucket/prefix, gs://…, file://…).

Every output of a run (checkpoints, results, summaries) goes through here so `--out` can be shared
storage on a cluster. Writes are atomic: a temporary name then a rename on file systems, a single
PUT on object stores — a reader never sees half a file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from typing import Iterator, Optional

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path within it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(root: str, *parts: str) -> str:
    """root/part/…; a URI's options (`?endpoint_override=…&scheme=http`) stay at the end."""
    if not is_uri(root):
        return os.path.join(root, *parts)
    base, query = root.split("?", 1) if "?" in root else (root, None)
    joined = "/".join([base.rstrip("/"), *parts])
    return joined if query is None else f"{joined}?{query}"


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


def write_json(path: str, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str):
    return json.loads(read_bytes(path))


def delete(path: str) -> None:
    """Remove a file if it exists."""
    f, p = resolve(path)
    if f.get_file_info(p).type != pafs.FileType.NotFound:
        f.delete_file(p)


class OutputError(ValueError):
    """An output location that cannot be written; the message names the fix."""


# how a full disk reads where the error arrives as text: SQLite (MLflow's store), a Ray worker's or a
# Tune trial's error, torch.save
NO_SPACE_TEXTS = ("No space left on device", "[Errno 28]", "database or disk is full", "file write failed")


def causes(e: Optional[BaseException]) -> Iterator[BaseException]:
    """e, then each error it was raised from or while handling (a Ray task error's `cause` first), once each."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


def out_of_space(e: Optional[BaseException]) -> bool:
    """Whether e, or an error it was raised from or while handling, says the disk is full."""
    return any(isinstance(c, OSError) and c.errno == errno.ENOSPC or any(t in str(c) for t in NO_SPACE_TEXTS) for c in causes(e))


def no_space_error(out: str) -> OutputError:
    """The one line a run that filled its disk ends with: where, how much is free, what the outputs take."""
    sizes = ""
    if not is_uri(out) and os.path.isdir(out):
        free = shutil.disk_usage(out).free
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(out) for f in names
                   if os.path.isfile(os.path.join(d, f)))
        sizes = f" ({_mib(free)} free there; its outputs so far take {_mib(used)})"
    return OutputError(f"no space left on the device holding {out}{sizes}: finished work is kept, nothing is half-written; "
                       "free space there and rerun the same command")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_output_dir(path: str) -> None:
    """Fail early, in one line, if `path` cannot hold a run's outputs: a file, a read-only folder,
    or an object store this machine cannot reach (no credentials, no such bucket)."""
    if is_uri(path):
        try:
            f, p = resolve(path)
            f.get_file_info(p)
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OutputError(f"--out {path} cannot be reached ({reason}): check the URI and this machine's credentials "
                              "(for S3: `aws configure`, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance profile)") from e
        return
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise OutputError(f"--out {path} is a file: give a folder (it is created if missing)")
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"--out {path} lies under a file ({probe}): give a folder")
    try:  # a real write: permission bits say nothing for root, nor for read-only mounts
        test = os.path.join(probe, f".overinterp-write-test-{uuid.uuid4().hex[:8]}")
        with open(test, "wb"):
            pass
        os.remove(test)
    except OSError as e:
        raise OutputError(f"--out {path} is not writable ({probe}: {e.strerror}): choose a folder you can write to") from e
