"""What `overinterp run` prints on a clean machine: our stage lines and progress, no Ray INFO line,
no `E` log line (the actor-constructor warning of ray-project/ray#53727 included), no warnings."""

import re

import pytest

pytestmark = pytest.mark.ray


# A Ray/glog error or fatal line, anywhere in a line: Ray prefixes what its processes print with the
# process, e.g. `(raylet) [2026-11-23 19:00:00,123 E 1234 5678] core_worker.cc:...`, and its C++
# logs may stamp microseconds (`19:00:00.123456`).
E_LINE = re.compile(r"\[\S+ [\d:,.]+ [EF] \d+")


def is_error_line(line: str) -> bool:
    return bool(E_LINE.search(line)) or "core_worker.cc" in line


def test_the_error_line_pattern_catches_rays_formats():
    for line in ("[2026-11-23 19:00:00,123 E 1234 5678] core_worker.cc:2740: Actor constructor failed",
                 "(raylet) [2026-11-23 19:00:00,123 E 1234 5678] worker_pool.cc:581: Some workers of the worker process",
                 "(SelectActor pid=4321) [2026-11-23 19:00:00.123456 E 4321 4400] task_receiver.cc:120: error",
                 "[2026-11-23 19:00:00,999 F 77 77] logging.cc:100: Check failed"):
        assert is_error_line(line), line
    for line in ("stage 2/4: selection (backselect) and the random baseline", "selection backselect digits_cnn-s0/train: 50%",
                 "(raylet) [2026-11-23 19:00:00,123 I 1234 5678] node_manager.cc:100: started", "digits_cnn E 1: 0.5"):
        assert not is_error_line(line), line


def test_a_smoke_run_prints_no_ray_chatter(smoke_cli_run):
    # `overinterp run --smoke --seeds 0,1 --explain ...`, as a user types it, in its own process: every selector,
    # fill and variant the default run has (Ray Data selection, Tune training, ROAD, MLflow), so
    # every source of the chatter this test forbids is there.
    out, printed, code = smoke_cli_run
    assert code == 0, printed[-3000:]
    lines = printed.splitlines()
    assert not [l for l in lines if re.search(r"\bINFO\b", l)], "Ray/MLflow INFO lines"
    assert not [l for l in lines if is_error_line(l)], "E log lines"
    assert not [l for l in lines if "Warning" in l or " WARNING " in l], "warnings"
    assert sum("stage " in l and "/5: " in l for l in lines) == 5  # one line per stage start (the fifth: --explain)
    # progress: one bar for every selection of the run (one pool of actors serves them all)
    assert any(re.match(r"selection backselect digits_cnn-s0/train and \d+ more: ", l) and "passes" in l for l in lines)
    assert any(l.startswith("training (subsets): ") for l in lines)
