"""One run per output: a lock on --out, held for the whole run and renewed while it lives.

The lock is `<out>/.overinterp.lock`, a small JSON document: host, pid, start time, and `renewed`,
a timestamp the holder rewrites every RENEW_S seconds from a background thread. Another run finds
it held unless its holder is gone:
- same host and the pid no longer exists (a killed driver): taken over at once, with a warning;
- otherwise, when `renewed` is older than LEASE_S (a holder on another machine that died): taken
  over after the lease, with a warning.

Local paths (and shared file systems with atomic exclusive create, e.g. NFSv4) take the lock with
O_CREAT | O_EXCL, so two runs starting together cannot both win. Object stores (s3://, gs://) have
no exclusive create here: the run writes its lock object, waits CONFIRM_S, and reads it back; a
run that finds another holder's lock there gives up. Two runs starting within the same second can
still both read back their own write on an eventually consistent store: the lock guards against
the realistic case (a second submission minutes later, or a forgotten one still running), not
against a deliberate race.

Taking over a stale lock is atomic on local paths: under an flock on `.overinterp.lock.takeover`
(created at the first takeover and left in place: removing it would reopen the race), the run reads
the lock again and replaces it only if it is still byte for byte the one judged stale. Two reruns
that both judged the same dead holder stale cannot both win: the second finds the first's new lock
and is refused. Runs that find no lock do not need the flock: O_EXCL decides between them. A file
system without flock support falls back to the unserialised takeover, with a warning. Object
stores delete the stale lock and write their own, with the limits above.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from overinterp import fs
from overinterp.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".overinterp.lock"
TAKEOVER_SUFFIX = ".takeover"  # <out>/.overinterp.lock.takeover: flocked while a stale lock is replaced; left in place
RENEW_S = 30.0
LEASE_S = 120.0
CONFIRM_S = 2.0


class LockHeld(ConfigError):
    """Another run holds the output; the message names it and the fix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Context manager holding the lock of one --out (path or URI)."""

    def __init__(self, out_dir: str, command: str = "overinterp run"):
        self.out_dir, self.path = out_dir, fs.join(out_dir, LOCK_NAME)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": command, "token": uuid.uuid4().hex}
        self.taken_over: Optional[dict] = None  # the stale holder this run replaced, if any
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- the lock document ---
    def _doc(self) -> bytes:
        return json.dumps({**self.me, "renewed": time.time()}).encode()

    def _read_raw(self) -> Optional[bytes]:
        try:
            return fs.read_bytes(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return b""

    @staticmethod
    def _parse(raw: Optional[bytes]) -> Optional[dict]:
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return {"host": "?", "pid": -1, "started": 0, "renewed": 0}  # unreadable: treated as stale after the lease
        return doc

    def read(self) -> Optional[dict]:
        return self._parse(self._read_raw())

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the holder is gone, or None while it may be alive."""
        if holder.get("host") == socket.gethostname() and holder.get("pid", -1) > 0 and not _alive(int(holder["pid"])):
            return f"its process {holder['pid']} on this host is gone"
        age = time.time() - float(holder.get("renewed", 0))
        if age > LEASE_S:
            return f"it has not renewed its lease for {age:.0f} s"
        return None

    def _held_error(self, holder: dict) -> LockHeld:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return LockHeld(f"{self.out_dir} is in use by another run ({holder.get('command', 'overinterp')} on host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, started {started}): wait for it to finish, or use another --out")

    # --- taking and releasing ---
    def _create_local(self) -> bool:
        _, p = fs.resolve(self.path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._doc())
        return True

    def _take_over_local(self, stale: bytes) -> bool:
        """Replace the lock judged stale with this run's; False when it is no longer that lock."""
        _, p = fs.resolve(self.path)
        fd = os.open(p + TAKEOVER_SUFFIX, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one takeover at a time; the kernel drops it if this process dies
            except OSError as e:  # a file system without locks: O_EXCL alone decides, and two takeovers may both win
                log.warning("cannot serialise the takeover of %s's lock (%s)", self.out_dir, e)
            try:
                with open(p, "rb") as f:
                    now = f.read()
            except FileNotFoundError:
                now = None
            if now != stale:
                return False  # another run took it over first (or the holder renewed): judge again
            os.unlink(p)
            return self._create_local()
        finally:
            os.close(fd)  # releases the flock

    def acquire(self) -> "OutputLock":
        local = not fs.is_uri(self.out_dir)
        for _ in range(3):  # a stale holder removed by a third run in between: try again
            raw = self._read_raw()
            holder = self._parse(raw)
            if holder is not None:
                why = self._stale(holder)
                if why is None:
                    raise self._held_error(holder)
                if local and not self._take_over_local(raw):
                    continue  # another run took it over first: read what is there now
                log.warning("taking over the lock of %s from %s (pid %s on %s): %s", self.out_dir, holder.get("command"), holder.get("pid"),
                            holder.get("host"), why)
                self.taken_over = holder
                if local:
                    break
                fs.delete(self.path)
            if local:
                if self._create_local():
                    break
                continue
            fs.write_bytes(self.path, self._doc())
            time.sleep(CONFIRM_S)
            mine = self.read()
            if mine is not None and mine.get("token") == self.me["token"]:
                break
            raise self._held_error(mine or {})
        else:
            raise self._held_error(self.read() or {})
        self._thread = threading.Thread(target=self._renew, name="overinterp-lock", daemon=True)
        self._thread.start()
        return self

    def check_free(self) -> None:
        """Raise LockHeld while a live run holds the lock; writes nothing (a dry run may call it)."""
        holder = self.read()
        if holder is not None and self._stale(holder) is None:
            raise self._held_error(holder)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                holder = self.read()
                if holder is not None and holder.get("token") != self.me["token"]:
                    log.error("the lock of %s was taken by another run (%s): this run's outputs may mix with it", self.out_dir, holder.get("pid"))
                    return
                fs.write_bytes(self.path, self._doc())
            except OSError as e:  # a transient storage error: the next renewal tries again
                log.warning("could not renew the lock of %s: %s", self.out_dir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder is not None and holder.get("token") == self.me["token"]:
            fs.delete(self.path)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
