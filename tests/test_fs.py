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


def test_write_leaves_no_temporary_files(tmp_path):
    fs.write_bytes(str(tmp_path / "d" / "f.bin"), b"abc")
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    fs.write_bytes(str(tmp_path / "d" / "f.bin"), b"xyz")  # replaced whole
    assert fs.read_bytes(str(tmp_path / "d" / "f.bin")) == b"xyz"
