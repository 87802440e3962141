"""pipeline/stream.py: what the streamed backend learns of a source from listings alone."""

import os


def test_the_listing_digest_is_that_of_one_sorted_listing_of_every_file(tmp_path):
    """Listed a class at a time, the digest is the one of a single recursive listing in path order,
    names and sizes only; it changes when a file's size does."""
    import hashlib

    from overinterp.pipeline.stream import listing_digest

    for rel, data in {"a/1.png": b"x", "a/sub/2.png": b"yy", "a.b/3.png": b"z", "a-c.png": b"w", "b/4.png": b"v"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    files = sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    root = str(tmp_path)
    expected = hashlib.sha256("".join(f"{p[len(root):]}:{os.path.getsize(p)}" for p in files).encode()).hexdigest()[:16]
    assert listing_digest(root) == expected
    (tmp_path / "a/sub/2.png").write_bytes(b"yyy")
    assert listing_digest(root) != expected
    assert len(listing_digest(str(tmp_path / "b/4.png"))) == 16
