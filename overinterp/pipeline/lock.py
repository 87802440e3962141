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
"""

from __future__ import annotations

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

    def read(self) -> Optional[dict]:
        try:
            return json.loads(fs.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": 0, "renewed": 0}  # unreadable: treated as stale after the lease

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

    def acquire(self) -> "OutputLock":
        local = not fs.is_uri(self.out_dir)
        for _ in range(3):  # a stale holder removed by a third run in between: try again
            holder = self.read()
            if holder is not None:
                why = self._stale(holder)
                if why is None:
                    raise self._held_error(holder)
                log.warning("taking over the lock of %s from %s (pid %s on %s): %s", self.out_dir, holder.get("command"), holder.get("pid"),
                            holder.get("host"), why)
                self.taken_over = holder
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
