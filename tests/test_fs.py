"""overinterp.fs: atomic writes and reads on paths and URIs."""

import os

from overinterp import fs


def test_roundtrip_on_path_and_uri(tmp_path):
    for root in (str(tmp_path / "a"), f"file://{tmp_path}/b"):
        p = fs.join(root, "x", "r.json")
        assert not fs.exists(p)
        fs.write_json(p, {"k": [1, 2]})
        assert fs.exists(p) and fs.read_json(p) == {"k": [1, 2]}
    assert fs.join("s3://bucket/prefix/", "trials", "m.pt") == "s3://bucket/prefix/trials/m.pt"
    # a URI's options stay at its end, where pyarrow reads them
    assert fs.join("s3://b/x?endpoint_override=h:9&scheme=http", "selections") == "s3://b/x/selections?endpoint_override=h:9&scheme=http"


def test_write_leaves_no_temporary_files(tmp_path):
    fs.write_bytes(str(tmp_path / "d" / "f.bin"), b"abc")
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    fs.write_bytes(str(tmp_path / "d" / "f.bin"), b"xyz")  # replaced whole
    assert fs.read_bytes(str(tmp_path / "d" / "f.bin")) == b"xyz"


def test_a_full_disk_is_recognised_however_it_arrives_and_named_in_one_line(tmp_path):
    import errno
    import sqlite3

    def raised_from(inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise RuntimeError("a trial failed") from e
        except RuntimeError as outer:
            return outer

    assert fs.out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert fs.out_of_space(raised_from(sqlite3.OperationalError("database or disk is full")))  # MLflow's SQLite store
    assert fs.out_of_space(RuntimeError("ray.exceptions.RayTaskError: ... OSError: [Errno 28] No space left on device"))  # as text
    assert not fs.out_of_space(raised_from(OSError(errno.EACCES, "Permission denied")))
    (tmp_path / "selections").mkdir()
    (tmp_path / "selections" / "part-0.parquet").write_bytes(b"x" * 3000)
    message = str(fs.no_space_error(str(tmp_path)))
    assert message.startswith(f"no space left on the device holding {tmp_path} (") and "its outputs so far take 3 KiB" in message
    assert "\n" not in message and message.endswith("free space there and rerun the same command")
