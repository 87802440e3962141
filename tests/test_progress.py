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


def test_start_time_counts_from_when_the_work_began():
    clock, out = Clock(), io.StringIO()
    clock.t = 50.0
    p = Progress(100, "images", "x", file=out, clock=clock, start=10.0)  # made 40 s after the work began
    p.update(20)
    assert p.line() == "x: 20 / 100 images (20.0%), 0.5 images/s, ETA 2 min 40 s"
    p.close()
    assert out.getvalue().splitlines()[-1] == "x: 20 / 100 images in 40 s, 0.5 images/s"


def test_tqdm_bar_starts_at_the_start_time_too():
    import time

    out = Terminal()
    p = Progress(10, "trials", "t", file=out, clock=time.monotonic, start=time.monotonic() - 100)
    assert p._bar.format_dict["elapsed"] >= 100
    p.close()


def test_update_to_moves_on_never_back_nor_past_the_total():
    clock, out = Clock(), io.StringIO()
    p = Progress(1000, "passes", file=out, interval=0, clock=clock)
    p.update_to(300)
    p.update_to(200)  # a poll that saw less (a batch's count cleared before its result arrived): no step back
    assert p.done == 300
    p.update(100)
    p.update_to(5000)
    assert p.done == 1000


def test_training_bar_counts_from_the_launch_not_the_first_finished_trial():
    """Tune's callback makes its bar when the first trial ends (a bar cannot be pickled); its rate
    and ETA must still count from the launch."""
    pytest.importorskip("ray.tune")
    from overinterp.pipeline.tune_stage import _Progress

    clock = Clock()
    cb = _Progress("subsets", total=4, done=0, clock=clock)  # launched at t = 0
    clock.t = 100.0  # the first trial ends 100 s later
    cb.on_trial_complete(0, [], trial=None)
    assert cb.bar.line() == "training (subsets): 1 / 4 trials (25.0%), 0.01 trials/s, ETA 5 min"
    cb.bar.close()


def test_a_steady_bar_leaves_the_start_up_out_of_rate_and_eta():
    """Selection's bar: 60 s of actor start-up, then 100 passes/s. Its ETA counts from the first
    update; the closing line still gives the whole time and the mean rate."""
    clock, out = Clock(), io.StringIO()
    p = Progress(10_000, "passes", "selection", file=out, interval=0, clock=clock, steady=True)
    clock.t = 60.0
    p.update(100)  # the first update: the start-up ends here
    assert p.line() == "selection: 100 / 10,000 passes (1.0%), 1.67 passes/s, ETA 1 h 39 min"  # nothing since: the mean
    clock.t = 70.0
    p.update(1000)
    assert p.line() == "selection: 1,100 / 10,000 passes (11.0%), 100 passes/s, ETA 1 min 29 s"
    plain = Progress(10_000, "passes", "selection", file=io.StringIO(), interval=0, clock=clock, start=0.0)
    plain.update(1100)
    assert plain.line() == "selection: 1,100 / 10,000 passes (11.0%), 15.7 passes/s, ETA 9 min 26 s"
    p.close()
    assert out.getvalue().splitlines()[-1] == "selection: 1,100 / 10,000 passes in 1 min 10 s, 15.7 passes/s"
