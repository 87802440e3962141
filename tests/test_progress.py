"""progress: plain lines at most every `interval` seconds (a fake clock), a tqdm bar on a terminal."""

import io
import threading

import pytest

from overinterp.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_are_throttled_and_formatted():
    clock, out = Clock(), io.StringIO()
    p = Progress(5_000_000, "passes", "selection", file=out, interval=10, clock=clock)
    for second in range(1, 101):  # 12,000 passes a second for 100 s, one update a second
        clock.t = float(second)
        p.update(12_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # at 10, 20, ..., 100 s
    assert lines[0] == "selection: 120,000 / 5,000,000 passes (2.4%), 12,000 passes/s, ETA 6 min 47 s"
    assert lines[-1] == "selection: 1,200,000 / 5,000,000 passes (24.0%), 12,000 passes/s, ETA 5 min 17 s"
    p.close()
    assert out.getvalue().splitlines()[-1] == "selection: 1,200,000 / 5,000,000 passes in 1 min 40 s, 12,000 passes/s"
    p.update(5)  # after close: ignored, nothing printed
    p.close()
    assert len(out.getvalue().splitlines()) == 11 and p.done == 1_200_000


def test_bursts_print_once_per_interval():
    clock, out = Clock(), io.StringIO()
    p = Progress(100, "images", "training", file=out, interval=10, clock=clock)
    clock.t = 9.9
    for _ in range(50):
        p.update(1)
    assert out.getvalue() == ""  # not yet 10 s
    clock.t = 10.0
    p.update(1)
    p.update(1)  # same instant: no second line
    assert out.getvalue() == "training: 51 / 100 images (51.0%), 5.1 images/s, ETA 10 s\n"  # printed by the update that crossed 10 s


def test_unknown_total_and_no_rate_yet():
    clock, out = Clock(), io.StringIO()
    p = Progress(None, "trials", "subsets", file=out, interval=0, clock=clock)
    assert p.line() == "subsets: 0 trials, 0 trials/s"
    clock.t = 400.0
    p.update(2)
    assert out.getvalue() == "subsets: 2 trials, 0.005 trials/s\n"
    q = Progress(10, "trials", "", file=out, clock=clock)
    assert q.line() == "0 / 10 trials (0.0%), 0 trials/s, ETA ?"


def test_context_manager_and_disabled_bar_on_a_terminal():
    clock, out = Clock(), Terminal()
    with Progress(4, "images", "x", enabled=False, file=out, clock=clock) as p:
        clock.t = 2.0
        p.update(4)
    assert out.getvalue() == "x: 4 / 4 images in 2 s, 2 images/s\n"  # plain, though out is a terminal


def test_tqdm_bar_on_a_terminal():
    out = Terminal()
    with Progress(1000, "passes", "selection", file=out) as p:
        p.update(400)
        p.update(600)
    text = out.getvalue()
    assert "selection" in text and "passes" in text and "100%" in text and "ETA" not in text  # tqdm's bar, not our line


def test_updates_from_threads_all_count():
    p = Progress(4000, "passes", file=io.StringIO(), interval=0.01)
    threads = [threading.Thread(target=lambda: [p.update(1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    assert p.done == 4000


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit must be one of passes, images, trials"):
        Progress(1, "steps")
    with pytest.raises(ValueError, match="total must be an int >= 0"):
        Progress(-1)
