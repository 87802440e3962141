"""Linux /proc, read the way the fault-injection tests find what to kill and what must have ended:
every process with its parent, state and title (Ray titles its workers ray::<what they run>)."""

from __future__ import annotations

import glob
from typing import NamedTuple


class Proc(NamedTuple):
    parent: int
    state: str  # R, S, Z (exited; only its parent's wait is missing), ...
    title: bytes  # the command line's first field: Ray's process title, e.g. b"ray::ImplicitFunc"
    cmdline: bytes  # every field, joined by spaces


def read(pid: int) -> Proc | None:
    """pid's Proc, None if there is no such process (or it exits while it is read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, IndexError):
        return None
    return Proc(int(fields[1]), fields[0], cmd.split(b"\0")[0].rstrip(), cmd.replace(b"\0", b" ").strip())


def processes() -> dict[int, Proc]:
    """{pid: Proc} of every process there now."""
    found = {int(d[6:]): read(int(d[6:])) for d in glob.glob("/proc/[0-9]*")}
    return {pid: p for pid, p in found.items() if p is not None}


def running(pid: int) -> bool:
    """pid exists and has not exited (a zombie has)."""
    p = read(pid)
    return p is not None and p.state != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below pid."""
    parents = {c: p.parent for c, p in processes().items()}
    found, frontier = [], {pid}
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = set(kids)
    return found


def titled(prefix: bytes) -> list[int]:
    """Processes whose title starts with prefix."""
    return [pid for pid, p in processes().items() if p.title.startswith(prefix)]


def selecting() -> dict[int, int]:
    """{pid: parent pid} of the selection actors in the middle of a batch: Ray titles one
    ray::MapWorker(MapBatches(SelectionWorker)).submit while a batch runs (.__init__ while it starts,
    no suffix while it waits). Killed then, a batch is lost."""
    return {pid: p.parent for pid, p in processes().items() if b"SelectionWorker" in p.title and p.title.endswith(b".submit")}
