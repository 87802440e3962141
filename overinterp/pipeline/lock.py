"""One run per output: a lock on --out, held for the whole run and renewed while it lives.

The lock is `<out>/.overinterp.lock`, a small JSON document: host, pid, start time, a token, and
`renewed`, a timestamp the holder rewrites every RENEW_S seconds from a background thread. Another
run finds it held unless its holder is gone:
- same host and the pid no longer exists (a killed driver): taken over at once, with a warning;
- otherwise, when `renewed` is older than LEASE_S (a holder on another machine that died): taken
  over after the lease, with a warning.
A lock that cannot be read or parsed is an error naming it, never judged stale: a storage outage
must not hand a live run's output to another run.

Every write of the lock is conditional, so of two runs exactly one wins:
- Local paths and `file://` (and shared file systems with hard links and flock, e.g. NFSv4): the
  document is written to a temporary file and hard-linked to the lock's name, which fails if the
  name exists, so the lock appears complete or not at all. A takeover holds an flock on
  `.overinterp.lock.takeover` (created at the first takeover and left in place: removing it would
  reopen the race), reads the lock again and replaces it only if it is still byte for byte the one
  judged stale. Renewing and releasing take the same flock where that file exists and act only on
  this run's own lock; where it does not, no takeover has begun, and one beginning meanwhile needs
  this holder's lease to have run out. A file system without flock falls back to unserialised
  takeovers, with a warning.
- `s3://`: S3's conditional writes, through boto3. The lock is created with `If-None-Match: *`
  (one of two creates succeeds), and renewed, taken over and deleted with `If-Match` on the ETag
  last read or written: a stale lock is replaced only if it is still the one judged stale.
- Other object stores (gs://, ...) have no conditional write here: the run writes its lock, waits
  CONFIRM_S and reads it back; two runs starting within the same second can both believe they
  hold it.

A holder whose renewal finds another run's lock in place (on s3://: its If-Match fails) has lost
the output. The renewal thread interrupts the main thread, and leaving the `with` block raises
LockLost, one line naming the other run: the run stops rather than mix its outputs with another's.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow.fs as pafs

from overinterp import fs
from overinterp.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".overinterp.lock"
TAKEOVER_SUFFIX = ".takeover"  # <out>/.overinterp.lock.takeover: flocked while the lock is replaced; left in place
RENEW_S = 30.0
LEASE_S = 120.0
CONFIRM_S = 2.0


class LockHeld(ConfigError):
    """Another run holds the output; the message names it and the fix."""


class LockLost(LockHeld):
    """Another run took this run's lock while it ran; the message names it."""


class LockError(ConfigError):
    """The lock cannot be read, parsed or written; the message names it and the fix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- where the lock lives: read() -> (bytes, version) or None; create, overwrite (the lock still at version), renew, remove -> bool
# A version identifies what was read: the bytes themselves locally, the ETag on S3.


class _UnconditionalLock:
    """Any other object store: plain writes, confirmed by reading back after CONFIRM_S. Its reads,
    renewal and removal (a check of the token, then a write or delete) serve _LocalLock too, which
    serialises them under an flock and creates and replaces the lock atomically."""

    def __init__(self, path: str):
        self.path = path

    def _serialised(self, create: bool = False):
        return contextlib.nullcontext()  # nothing to serialise with: two takeovers may both win

    def read(self) -> Optional[tuple[bytes, bytes]]:
        try:
            raw = fs.read_bytes(self.path)
        except FileNotFoundError:
            return None
        return raw, raw

    def create(self, doc: bytes) -> bool:
        fs.write_bytes(self.path, doc)
        time.sleep(CONFIRM_S)
        now = self.read()
        return now is not None and _token(now[0]) == _token(doc)

    def overwrite(self, version: bytes, doc: bytes) -> bool:
        fs.delete(self.path)
        return self.create(doc)

    def renew(self, token: str, doc: bytes) -> bool:
        with self._serialised():
            now = self.read()
            if now is None or _token(now[0]) != token:
                return False
            fs.write_bytes(self.path, doc)  # whole or not at all (fs.write_bytes: a rename on a file system)
            return True

    def remove(self, token: str) -> None:
        with self._serialised():
            now = self.read()
            if now is not None and _token(now[0]) == token:
                fs.delete(self.path)


class _LocalLock(_UnconditionalLock):
    """A lock file on a local or shared file system: created by a hard link, replaced under an flock."""

    def create(self, doc: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(doc)
        try:
            os.link(tmp, self.path)  # complete or absent: a reader never sees an empty lock
        except FileExistsError:
            return False
        except OSError as e:  # no hard links (some FUSE mounts): an exclusive create, which a reader can see empty for a moment
            log.warning("cannot hard-link the lock of %s (%s): creating it in place", self.path, e)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(doc)
        finally:
            os.unlink(tmp)
        return True

    @contextlib.contextmanager
    def _serialised(self, create: bool = False):
        try:
            fd = os.open(self.path + TAKEOVER_SUFFIX, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:  # no takeover yet: one starting now needs this holder's lease to have run out
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one replacement at a time; the kernel drops it if this process dies
            except OSError as e:  # a file system without locks: two takeovers may both win
                log.warning("cannot serialise replacing the lock %s (%s)", self.path, e)
            yield
        finally:
            os.close(fd)  # releases the flock

    def overwrite(self, version: bytes, doc: bytes) -> bool:
        with self._serialised(create=True):
            now = self.read()
            if now is None or now[0] != version:
                return False  # another run took it over first (or the holder renewed): judge again
            os.unlink(self.path)
            return self.create(doc)


class _S3Lock:
    """A lock object on S3, written only with conditional requests."""

    ABSENT = {"NoSuchKey", "404"}
    CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"} | ABSENT  # If-Match on a deleted lock: 404

    def __init__(self, out_dir: str):
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as e:
            raise ConfigError(f"the lock of an s3:// --out is taken with boto3, which is not installed: "
                              f"pip install 'boto3>=1.36' (the `cluster` extra) ({e})") from e
        self.ClientError, self.errors = ClientError, (BotoCoreError, ClientError)
        u = urlparse(out_dir)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}  # pyarrow's URI options, e.g. endpoint_override=host:port&scheme=http
        kwargs = {}
        if "endpoint_override" in q:
            ep = q["endpoint_override"]
            kwargs["endpoint_url"] = ep if "://" in ep else f"{q.get('scheme', 'https')}://{ep}"
        if "region" in q:
            kwargs["region_name"] = q["region"]
        if u.username:
            kwargs.update(aws_access_key_id=unquote(u.username), aws_secret_access_key=unquote(u.password or ""))
        self.client = boto3.client("s3", **kwargs)  # else boto3's own chain: AWS_ENDPOINT_URL, AWS_REGION, credentials
        if "IfMatch" not in self.client.meta.service_model.operation_model("PutObject").input_shape.members:
            raise ConfigError(f"boto3 {boto3.__version__} cannot send S3's conditional writes, which the lock of an s3:// --out "
                              "needs: pip install 'boto3>=1.36'")
        self.bucket, self.key = u.hostname, "/".join(p for p in (u.path.strip("/"), LOCK_NAME) if p)
        self.etag: Optional[str] = None  # of the lock this run wrote last

    @staticmethod
    def _is(e, codes: set) -> bool:
        return (e.response.get("Error", {}).get("Code") in codes
                or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")) in codes)

    def _call(self, fn, expected: set, otherwise):
        """fn(); a client error whose code is in `expected` gives `otherwise`; any other error is an OSError."""
        try:
            return fn()
        except self.ClientError as e:
            if self._is(e, expected):
                return otherwise
            raise OSError(str(e)) from e
        except self.errors as e:
            raise OSError(str(e)) from e

    def read(self) -> Optional[tuple[bytes, str]]:
        def get():
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return r["Body"].read(), r["ETag"]
        return self._call(get, self.ABSENT, None)

    def _put(self, doc: bytes, **condition) -> bool:
        def put():
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=doc, **condition)["ETag"]
            return True
        return self._call(put, self.CONFLICTS, False)

    def create(self, doc: bytes) -> bool:
        return self._put(doc, IfNoneMatch="*")

    def overwrite(self, version: str, doc: bytes) -> bool:
        return self._put(doc, IfMatch=version)

    def renew(self, token: str, doc: bytes) -> bool:
        return self._put(doc, IfMatch=self.etag)

    def remove(self, token: str) -> None:
        # a conflict: no longer this run's lock, so it stays
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag), self.CONFLICTS, None)


def _token(raw: bytes) -> Optional[str]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("token") if isinstance(doc, dict) else None


def _where(out_dir: str):
    """Where the lock of out_dir lives, and how it is written."""
    if not fs.is_uri(out_dir):
        return _LocalLock(os.path.join(os.path.abspath(out_dir), LOCK_NAME))
    if out_dir.startswith("s3://"):
        return _S3Lock(out_dir)  # parsed from the --out itself: its query (?endpoint_override=…) must not swallow the name
    f, p = fs.resolve(out_dir)
    if isinstance(f, pafs.LocalFileSystem):
        return _LocalLock(os.path.join(p, LOCK_NAME))
    return _UnconditionalLock(fs.join(out_dir, LOCK_NAME))


class OutputLock:
    """Context manager holding the lock of one --out (path or URI). When another run takes the lock
    over, the renewal thread interrupts the main thread, and leaving the `with` block raises LockLost."""

    def __init__(self, out_dir: str, command: str = "overinterp run"):
        self.out_dir, self.path = out_dir, fs.join(out_dir, LOCK_NAME)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": command, "token": uuid.uuid4().hex}
        self.taken_over: Optional[dict] = None  # the stale holder this run replaced, if any
        self.lost: Optional[str] = None  # why this run no longer holds the lock, once another run took it
        self._store = _where(out_dir)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- the lock document ---
    def _doc(self) -> bytes:
        return json.dumps({**self.me, "renewed": time.time()}).encode()

    def _storage(self, action: str, fn, *args):
        """fn(*args), a storage error being one line naming the lock."""
        try:
            return fn(*args)
        except OSError as e:
            raise LockError(f"cannot {action} the lock {self.path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                            "check the storage and this machine's credentials, then rerun") from e

    def _read(self) -> Optional[tuple[bytes, object]]:
        return self._storage("read", self._store.read)

    def _parse(self, raw: bytes) -> dict:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise LockError(f"{self.path} is not a lock this program wrote ({len(raw)} bytes): "
                                 f"if no run is using {self.out_dir}, delete it and rerun")
        return doc

    def read(self) -> Optional[dict]:
        found = self._read()
        return None if found is None else self._parse(found[0])

    def _stale(self, holder: dict) -> Optional[str]:
        """Why the holder is gone, or None while it may be alive."""
        if holder.get("host") == socket.gethostname() and holder.get("pid", -1) > 0 and not _alive(int(holder["pid"])):
            return f"its process {holder['pid']} on this host is gone"
        age = time.time() - float(holder.get("renewed", 0))
        if age > LEASE_S:
            return f"it has not renewed its lease for {age:.0f} s"
        return None

    @staticmethod
    def _who(holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return f"{holder.get('command', 'overinterp')} on host {holder.get('host')}, pid {holder.get('pid')}, started {started}"

    def _held_error(self, holder: dict) -> LockHeld:
        return LockHeld(f"{self.out_dir} is in use by another run ({self._who(holder)}): wait for it to finish, or use another --out")

    # --- taking and releasing ---
    def acquire(self) -> "OutputLock":
        for _ in range(3):  # the lock changed between reading and writing it (another run won): judge again
            found = self._read()
            if found is None:
                if self._storage("write", self._store.create, self._doc()):
                    break
                continue
            holder = self._parse(found[0])
            why = self._stale(holder)
            if why is None:
                raise self._held_error(holder)
            if not self._storage("write", self._store.overwrite, found[1], self._doc()):
                continue  # no longer the lock judged stale: another run took it over first
            log.warning("taking over the lock of %s from %s (pid %s on %s): %s", self.out_dir, holder.get("command"), holder.get("pid"),
                        holder.get("host"), why)
            self.taken_over = holder
            break
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
                if self._store.renew(self.me["token"], self._doc()):
                    continue
            except OSError as e:  # a transient storage error: the next renewal tries again, well within the lease
                log.warning("could not renew the lock of %s: %s", self.out_dir, e)
                continue
            try:
                holder = self.read() or {}
            except ConfigError:
                holder = {}
            self.lost = (f"{self.out_dir} was taken over by another run ({self._who(holder)}) while this run held it: "
                         "this run stopped so that their outputs do not mix; finished work is kept in --out")
            log.error(self.lost)
            _thread.interrupt_main()
            return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is None:
            try:
                self._store.remove(self.me["token"])
            except OSError as e:  # left behind: the next run takes it over once the lease ends
                log.warning("could not remove the lock of %s: %s", self.out_dir, e)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        if self.lost is not None and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise LockLost(self.lost) from exc  # the interrupt came from the renewal thread: say why
        return False
