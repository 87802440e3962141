import os

import pytest
import torch
import torch.nn as nn


def pytest_collection_modifyitems(config, items):
    """Tests marked `benchmark` run whole benchmark scripts (minutes each): only when asked for by
    `-m benchmark` (or any -m expression naming the marker positively)."""
    expr = config.option.markexpr or ""
    if "benchmark" in expr and "not benchmark" not in expr:
        return
    skip = pytest.mark.skip(reason="a benchmark script's quick run: select it with -m benchmark")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """mlflow.set_tracking_uri() (called by every in-process run) writes $MLFLOW_TRACKING_URI, and
    jobs started later as subprocesses inherit it: they would log into an earlier test's database
    instead of <out>/mlflow.db. Restore the variable after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def damaged_folder(tmp_path):
    """A 3-class ImageFolder train split (12 images, 40 px) in which one JPEG is truncated, plus a
    text file named .jpg: two files that do not decode, among real ones."""
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path), n_per_class=4, num_classes=3, size=40)
    train = tmp_path / "train"
    jpg = train / "n00000000" / "00000.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (train / "n00000001" / "notes.jpg").write_text("not an image")
    return str(train)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: 2 CPUs, no dashboard, on loopback (the embedded
    local Ray of overinterp itself)."""
    ray = pytest.importorskip("ray")
    from overinterp.pipeline.resources import ray_init_local

    if not ray.is_initialized():
        ray_init_local(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint for the whole session: moto's server on loopback with one bucket
    (tests/s3server.py). Its env is what a user's shell would export to reach it."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    import logging

    import s3server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request line per S3 call otherwise
    s3, server = s3server.start()
    yield s3
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 endpoint, with this process's environment pointed at it for one test."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def smoke_cli_run(tmp_path_factory):
    """`overinterp run --smoke --seeds 0,1 --explain vce,disagree ...` as a user types it, once per session, in its own process
    with its own embedded Ray: (out dir, everything it printed, exit code). Its outputs are checked
    by test_pipeline.py, what it printed by test_terminal.py."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke-cli") / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    explain = ["--explain", "vce,disagree", "--explain-method", "universal", "--explain-images", "2", "--prior-steps", "20"]
    p = subprocess.run([sys.executable, "-m", "overinterp.cli", "run", "--smoke", "--seeds", "0,1", *explain, "--out", str(out)],
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True,
                       timeout=1800)
    return out, p.stdout + p.stderr, p.returncode


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory):
    """The undisturbed smoke run every fault-injection and multi-node test compares with
    (tests/smoke_reference.py), once per session."""
    from smoke_reference import reference_run

    return reference_run(str(tmp_path_factory.mktemp("smoke-reference") / "out"))


class TinyConvNet(nn.Module):
    """A seeded 3-class conv net small enough for the brute-force twin."""

    def __init__(self, channels: int = 2, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1).to(dtype)
        self.fc = nn.Linear(4 * 16, 3).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))  # unsaturated softmax

    def forward(self, x):
        x = torch.relu(self.conv(x.to(self.fc.weight.dtype)))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny_net():
    return TinyConvNet().eval()
