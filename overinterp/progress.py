"""One progress display for selection (passes) and training (images, trials).

On a terminal it is a tqdm bar; in a log (not a TTY, or enabled=False) it is a plain line at most
every `interval` seconds, and one at the end:

    selection: 1,234,000 / 5,000,000 passes (24.7%), 12,000 passes/s, ETA 5 min 13 s

so a run's log stays readable (tqdm's carriage returns turn a log file into one endless line).
Updates are counted under a lock, so a callback in the driver thread (Ray Data batches arriving,
Tune results) and any other thread may call `update`. The rate is the mean since the start, which
is what an ETA needs when every unit costs about the same (a trial, its start included); with
`steady=True` it is the mean since the first update, for work whose start-up is paid once (selection:
actors start and load the model, then passes flow at one rate).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional, TextIO

from overinterp.costplan import format_duration, format_rate

UNITS = ("passes", "images", "trials")


class Progress:
    """Progress of `total` units: `update(n)` as they finish, `close()` (or a `with` block) at the end.

    Args:
        total: units expected (None: unknown — no percentage, no ETA).
        unit: "passes", "images" or "trials".
        desc: what is running, e.g. "selection" or "training digits_cnn".
        enabled: False forces the plain lines even on a terminal.
        file: where to write (stderr by default, like tqdm).
        interval: seconds between plain lines, at least.
        clock: seconds, monotonic (tests pass a fake one).
        start: the clock's time the work began (default: now). A bar made after the work started
            (training's, at the first finished trial) passes it, so rate and ETA count from then.
        steady: rate and ETA of the plain lines count from the first update on (the units done
            since, over the time since): a start-up paid once does not inflate the ETA.
    """

    def __init__(self, total: Optional[int], unit: str = "passes", desc: str = "", *, enabled: bool = True,
                 file: Optional[TextIO] = None, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 start: Optional[float] = None, steady: bool = False):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be an int >= 0 or None, got {total!r}")
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.total, self.unit, self.desc = total, unit, desc
        self.file = sys.stderr if file is None else file
        self.interval, self.clock = interval, clock
        self.done = 0
        self.closed = False
        self._lock = threading.Lock()
        now = clock()
        self._start = now if start is None else min(start, now)
        self._last = now
        self.steady = steady
        self._first: Optional[tuple[float, int]] = None  # (clock, units done) at the first update, when steady
        self._bar = None
        isatty = getattr(self.file, "isatty", None)
        if enabled and isatty is not None and isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=f" {unit}", desc=desc, file=self.file, unit_scale=True, dynamic_ncols=True,
                             mininterval=0.5)
            self._bar.start_t -= now - self._start  # tqdm's own clock (time.time): the same elapsed time

    def update(self, n: int = 1) -> None:
        """Count n more finished units; prints a plain line when `interval` has passed since the last."""
        with self._lock:
            self._add(n)

    def update_to(self, n: int) -> None:
        """Move on to n units done, if that is more than counted (never back, never past the total):
        for a count polled from elsewhere (passes of batches still running, see select_stage)."""
        with self._lock:
            target = int(n) if self.total is None else min(int(n), self.total)
            if target > self.done:
                self._add(target - self.done)

    def _add(self, n: int) -> None:  # under self._lock
        if self.closed:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if self.steady and self._first is None:
            self._first = (now, self.done)
        if now - self._last >= self.interval:
            self._last = now
            self._write(self.line(now))

    def _head_rate(self, now: float) -> tuple[str, float, float]:
        """("<desc>: " or "", seconds since the start, units per second since the start) as of `now`."""
        elapsed = now - self._start
        return (f"{self.desc}: " if self.desc else ""), elapsed, (self.done / elapsed if elapsed > 0 else 0.0)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line as of `now` (default: the clock)."""
        now = self.clock() if now is None else now
        head, _, rate = self._head_rate(now)
        if self._first is not None and now > self._first[0] and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / (now - self._first[0])
        if self.total is None:
            return f"{head}{self.done:,} {self.unit}, {format_rate(rate)} {self.unit}/s"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = max(self.total - self.done, 0)
        eta = format_duration(left / rate) if rate > 0 else ("0 s" if not left else "?")
        return f"{head}{self.done:,} / {self.total:,} {self.unit} ({pct:.1f}%), {format_rate(rate)} {self.unit}/s, ETA {eta}"

    def close(self) -> None:
        """Finish: the bar closes, or a last plain line gives the count and the time taken."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._bar is not None:
                self._bar.close()
                return
            head, elapsed, rate = self._head_rate(self.clock())
            of = f" / {self.total:,}" if self.total is not None else ""
            self._write(f"{head}{self.done:,}{of} {self.unit} in {format_duration(elapsed)}, {format_rate(rate)} {self.unit}/s")

    def _write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
