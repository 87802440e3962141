"""Every bad input: one clear line on stderr, a non-zero exit, and nothing already in --out changed
or lost. Most fail before Ray starts; none runs a stage."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from overinterp import store
from overinterp.cli import main
from overinterp.synthetic import write_imagefolder


def _tree(out) -> dict:
    """Every file under out with its content hash (what 'nothing changed or lost' compares)."""
    found = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            found[os.path.relpath(p, out)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return found


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(["run", *argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str, prefix="overinterp: error: ") -> str:
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err


def _existing_out(tmp_path):
    """An --out holding a finished selection: what a bad input must leave alone."""
    out = tmp_path / "out"
    root = str(out / "selections")
    for ids in ([0, 1], [2, 3]):
        store.write_rows(root, model="digits_cnn-s0", selector="backselect", selector_params="{}", split="test",
                         image_id=np.array(ids), label=np.array([0, 1]), order=torch.arange(4).expand(2, 4), height=2, width=2)
    return out


def test_corrupt_parquet_shard(tmp_path, capsys):
    out = _existing_out(tmp_path)
    shard = sorted((out / "selections").rglob("part-*.parquet"))[0]
    shard.write_bytes(b"PAR1 not really")
    before = _tree(out)
    rc, err = _run(["--smoke", "--out", str(out)], capsys)
    assert rc == 1 and str(shard) in _one_line(err) and "overinterp store repair --out" in err
    assert _tree(out) == before


def test_foreign_parquet_shard(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _existing_out(tmp_path)
    foreign = out / "selections" / "digits_cnn-s0" / "backselect" / "test" / "part-somebody-else.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    before = _tree(out)
    rc, err = _run(["--smoke", "--out", str(out)], capsys)
    assert rc == 1 and str(foreign) in _one_line(err) and "schema version ?" in err
    assert _tree(out) == before


@pytest.fixture
def folder_with_a_truncated_jpeg(tmp_path):
    write_imagefolder(str(tmp_path / "data"), n_per_class=3, num_classes=2, size=16)
    bad = tmp_path / "data" / "train" / "n00000000" / "00000.jpg"
    bad.write_bytes(bad.read_bytes()[:120])
    return tmp_path / "data", bad


def test_truncated_jpeg_with_strict(folder_with_a_truncated_jpeg, tmp_path, capsys):
    data, bad = folder_with_a_truncated_jpeg
    rc, err = _run(["--dataset", "imagefolder", "--data-root", str(data), "--image-size", "16", "--strict", "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and str(bad) in _one_line(err) and "drop --strict" in err
    assert not (tmp_path / "o").exists() or _tree(tmp_path / "o") == {}
    out = _existing_out(tmp_path)  # and an --out that already holds work is left as it was
    before = _tree(out)
    rc, err = _run(["--dataset", "imagefolder", "--data-root", str(data), "--image-size", "16", "--strict", "--out", str(out)], capsys)
    assert rc == 1 and str(bad) in _one_line(err) and _tree(out) == before


def test_empty_class_folder(tmp_path, capsys):
    write_imagefolder(str(tmp_path / "data"), n_per_class=2, num_classes=2, size=16)
    (tmp_path / "data" / "train" / "n00000009").mkdir()
    out = _existing_out(tmp_path)
    before = _tree(out)
    rc, err = _run(["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--out", str(out)], capsys)
    assert rc == 1 and "n00000009" in _one_line(err)
    assert _tree(out) == before


def test_data_root_without_images(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    out = _existing_out(tmp_path)
    before = _tree(out)
    rc, err = _run(["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--out", str(out)], capsys)
    assert rc == 1 and str(tmp_path / "data") in _one_line(err)
    assert _tree(out) == before


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    rc, err = _run(["--smoke", "--out", str(f)], capsys)
    assert rc == 2 and "is a file" in _one_line(err) and f.read_text() == "keep me"


def test_out_is_read_only(capsys):
    rc, err = _run(["--smoke", "--out", "/proc/overinterp-out"], capsys)  # read-only even for root
    assert rc == 2 and "is not writable" in _one_line(err)


def test_out_is_a_read_only_folder_with_content(tmp_path):
    """A real --out holding work, made read-only: by its permission bits for a normal user; for root
    (whom permission bits do not stop) by a read-only bind mount in a private mount namespace."""
    import shutil
    import subprocess
    import sys

    out = _existing_out(tmp_path)
    before = _tree(out)
    cli = [sys.executable, "-m", "overinterp.cli", "run", "--smoke", "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/t.db"]
    if os.geteuid() != 0:
        out.chmod(0o555)
        argv = cli
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"]).returncode == 0:
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(out), *cli]
    else:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    finally:
        out.chmod(0o755)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"overinterp: error: --out {out} is not writable ({out}: Read-only file system" if os.geteuid() == 0
                               else f"overinterp: error: --out {out} is not writable ({out}: Permission denied"), p.stderr
    assert p.stderr.count("\n") == 1 and "choose a folder you can write to" in p.stderr
    assert _tree(out) == before and not (tmp_path / "t.db").exists()


def test_out_uri_without_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.time()
    rc, err = _run(["--smoke", "--out", "s3://no-such-bucket/x?endpoint_override=127.0.0.1:9&scheme=http",
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], capsys)
    assert rc == 2 and "cannot be reached" in _one_line(err) and "credentials" in err
    assert time.time() - t0 < 60
    assert os.listdir(tmp_path) == []  # nothing written locally either: no tracking store, no staging files


def test_unreachable_tracking_server(tmp_path, capsys):
    t0 = time.time()
    rc, err = _run(["--smoke", "--out", str(tmp_path / "o"), "--tracking-uri", "http://127.0.0.1:9"], capsys)
    assert rc == 2 and "does not answer within 5 s" in _one_line(err)
    assert time.time() - t0 < 15 and not (tmp_path / "o").exists()
    out = _existing_out(tmp_path)
    before = _tree(out)
    rc, err = _run(["--smoke", "--out", str(out), "--tracking-uri", "http://127.0.0.1:9"], capsys)
    assert rc == 2 and "does not answer within 5 s" in _one_line(err) and _tree(out) == before


def test_unknown_names(tmp_path, capsys):
    out = _existing_out(tmp_path)
    before = _tree(out)
    for argv, match in ((["--dataset", "mnist"], "unknown data set 'mnist'"), (["--models", "resnet21"], "unknown model 'resnet21'")):
        rc, err = _run([*argv, "--out", str(out)], capsys)
        assert rc == 2 and match in _one_line(err)
    assert _tree(out) == before


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    """Refused at once: before the data is loaded, Ray starts or the ETA is calibrated."""
    from overinterp.pipeline import memory, resources
    from overinterp.pipeline.lock import OutputLock

    def too_late(*a, **k):
        raise AssertionError("the lock is checked only after the expensive work started")

    monkeypatch.setattr(memory, "load_data", too_late)
    monkeypatch.setattr(resources, "ensure_ray", too_late)
    out = _existing_out(tmp_path)
    before = _tree(out)
    with OutputLock(str(out), "another overinterp run"):
        rc, err = _run(["--smoke", "--out", str(out)], capsys)
    assert rc == 2 and "is in use by another run (another overinterp run on host" in _one_line(err)
    assert f"pid {os.getpid()}" in err and _tree(out) == before


def test_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    from overinterp.pipeline.lock import LOCK_NAME, OutputLock

    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345, "started": 0, "renewed": time.time()}))
    with caplog.at_level("WARNING"), OutputLock(str(tmp_path)) as lock:
        assert lock.taken_over["pid"] == 2**22 + 12345
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("taking over the lock" in r.message for r in caplog.records)
    assert not (tmp_path / LOCK_NAME).exists()  # released


def _parquet(path, labels, columns=("image", "label")):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    pq.write_table(pa.table({columns[0]: [buf.getvalue()] * len(labels), columns[1]: labels}), path)
    return str(path)


@pytest.fixture
def sources(tmp_path):
    """Small sources, each wrong in one way."""
    one_class = tmp_path / "one_class"
    write_imagefolder(str(one_class), n_per_class=2, num_classes=1, size=16)
    write_imagefolder(str(tmp_path / "two"), n_per_class=2, num_classes=2, size=16)
    (tmp_path / "garbage.parquet").write_text("not Parquet")
    (tmp_path / "afile").write_text("x")
    return {"one_class": str(one_class), "folder_val": str(tmp_path / "two" / "val"), "two": str(tmp_path / "two"), "garbage": str(tmp_path / "garbage.parquet"),
            "labels": _parquet(tmp_path / "labels.parquet", [0, 5, 7, 9]), "afile": str(tmp_path / "afile"),
            "columns": _parquet(tmp_path / "columns.parquet", [0, 1], ("img", "y")), "nowhere": str(tmp_path / "nowhere")}


BAD_DRY_RUNS = [  # (flags, exit status, what the one line must say); every one a --dry-run
    (["--dataset", "imagefolder", "--data-root", "{one_class}"], 1, "has one class folder (n00000000): a classifier needs at least 2"),
    (["--dataset", "imagefolder", "--data-root", "{one_class}", "--stream"], 1, "has one class folder (n00000000)"),
    (["--train", "{garbage}", "--val", "{garbage}"], 1, "garbage.parquet is not a readable Parquet file"),
    (["--train", "{labels}", "--val", "{labels}", "--num-classes", "3"], 1, "labels run to 9, beyond the 3 classes (0..2): give --num-classes 10"),
    (["--train", "{columns}", "--val", "{columns}"], 1, "Parquet sources need columns image (encoded bytes) and label"),
    (["--train", "{labels}", "--val", "{folder_val}"], 2, "is Parquet but --val"),
    (["--train", "s3://no-such-bucket/t?endpoint_override=127.0.0.1:9&scheme=http", "--val", "s3://no-such-bucket/v?endpoint_override=127.0.0.1:9&scheme=http"],
     2, "cannot be reached"),
    (["--image-size", "100000", "--dataset", "imagefolder", "--data-root", "{one_class}"], 2, "--image-size must be at most 1024 px"),
    (["--models", "digits_cnn,digits_cnn"], 2, "--models must be distinct"),
    (["--models", ""], 2, "argument --models: needs at least one model name"),
    (["--seeds", "a"], 2, "argument --seeds: expected comma-separated ints, got 'a' (see overinterp run --help)"),
    (["--data-root", "{nowhere}"], 2, "digits is built in and takes no --data-root"),
    (["--download"], 2, "digits cannot be downloaded"),
    (["--dataset", "cifar10", "--download"], 2, "--download needs --data-root DIR"),
    (["--dataset", "cifar10", "--data-root", "{afile}"], 2, "is a file: give the folder that holds the cifar10 data set"),
    (["--num-classes", "5"], 2, "--num-classes 5, but digits has 10 classes: drop --num-classes"),
    (["--dataset", "imagefolder", "--data-root", "{two}", "--num-classes", "3"], 2, "two/train has 2 classes (its class folders)"),
    (["--pixels-per-step", "1000"], 2, "--pixels-per-step 1000 is more than the 8×8 = 64 pixels"),
    (["--tracking-uri", "garbage"], 2, "is a file store, which MLflow 3 refuses"),
    (["--experiment", " "], 2, "--experiment needs a name"),
    (["--explain-images", "5"], 2, "--explain-images: only the explain stage uses this"),
    (["--explain", "vce", "--generator", "{nowhere}"], 2, "is not a folder: give a diffusers pipeline folder"),
]


@pytest.mark.parametrize("flags, status, says", BAD_DRY_RUNS, ids=[" ".join(f[:2]) + f" {i}" for i, (f, _, _) in enumerate(BAD_DRY_RUNS)])
def test_bad_input_is_one_line_before_any_work(flags, status, says, sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    out = tmp_path / "out"
    try:
        rc = main(["run", *[f.format(**sources) for f in flags], "--out", str(out), "--dry-run"])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == status and says in _one_line(err), err
    assert not out.exists()
