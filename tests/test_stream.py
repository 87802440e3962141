"""pipeline/stream.py: what the streamed backend learns of a source from listings alone."""

import os

import pyarrow.fs as pafs


def recursive_listings(monkeypatch) -> list:
    """The folders listed recursively from now on, in order: every listing the driver makes goes
    through a pyarrow FileSelector."""
    listed, real = [], pafs.FileSelector

    def counting(base_dir, *args, **kwargs):
        if kwargs.get("recursive"):
            listed.append(base_dir)
        return real(base_dir, *args, **kwargs)

    monkeypatch.setattr(pafs, "FileSelector", counting)
    return listed


def test_the_listing_digest_is_that_of_one_sorted_listing_of_every_file(tmp_path):
    """Listed a class at a time, the digest is the one of a single recursive listing in path order,
    names and sizes only; it changes when a file's size does."""
    import hashlib

    from overinterp.pipeline.images import forget_listings
    from overinterp.pipeline.stream import listing_digest

    for rel, data in {"a/1.png": b"x", "a/sub/2.png": b"yy", "a.b/3.png": b"z", "a-c.png": b"w", "b/4.png": b"v"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    files = sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    root = str(tmp_path)
    expected = hashlib.sha256("".join(f"{p[len(root):]}:{os.path.getsize(p)}" for p in files).encode()).hexdigest()[:16]
    assert listing_digest(root) == expected
    (tmp_path / "a/sub/2.png").write_bytes(b"yyy")
    assert listing_digest(root) == expected  # the listing is made once per run (a run forgets older ones when it starts: driver.prepare)
    forget_listings()
    assert listing_digest(root) != expected
    assert len(listing_digest(str(tmp_path / "b/4.png"))) == 16


def test_a_run_lists_its_folder_once_for_counts_checks_digest_and_datasets(ray_session, tmp_path, monkeypatch):
    """StreamSource.open lists each split once (one recursive listing per class folder); counting,
    checking, the digest and every dataset built after it reuse that listing."""
    from overinterp.config import RunConfig
    from overinterp.pipeline.images import read_encoded
    from overinterp.pipeline.stream import StreamSource, listing_digest
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "data"), n_per_class=3, num_classes=2, size=16)
    recursive = recursive_listings(monkeypatch)
    cfg = RunConfig(train=str(tmp_path / "data/train"), val=str(tmp_path / "data/val"), stream=True, image_size=16,
                    out_dir=str(tmp_path / "out")).resolved()
    src = StreamSource.open(cfg)
    assert src.n_images == {"train": 6, "test": 6}
    assert sorted(recursive) == sorted(str(tmp_path / "data" / s / c) for s in ("train", "val") for c in src.classes)
    listing_digest(src.train)
    for split in ("train", "test"):
        read_encoded(src.path(split), src.classes)
    # the class folders are not listed again; Ray Data's read_binary_files lists the split itself, once per dataset
    assert sorted(recursive) == sorted([*(str(tmp_path / "data" / s / c) for s in ("train", "val") for c in src.classes),
                                        str(tmp_path / "data/train"), str(tmp_path / "data/val")])


def test_a_run_that_decides_to_stream_a_folder_lists_it_once(tmp_path, monkeypatch):
    """A --data-root folder is counted to decide in memory or streamed; when it streams (here: too
    big for a machine of 1 KiB), StreamSource.open reuses that count's listings: one recursive
    listing per class folder in all. Its resources plan the streamed trials at once."""
    from overinterp.config import RunConfig
    from overinterp.pipeline import driver
    from overinterp.pipeline.resources import find_capacity, plan_resources
    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "data"), n_per_class=3, num_classes=2, size=16)
    recursive = recursive_listings(monkeypatch)
    monkeypatch.setattr(driver, "machine_memory", lambda: 1024)
    cfg = RunConfig(dataset="imagefolder", data_root=str(tmp_path / "data"), image_size=16, out_dir=str(tmp_path / "out"))
    cfg, src, _, resources = driver.prepare(cfg)
    assert cfg.stream and src.n_images == {"train": 6, "test": 6}
    assert sorted(recursive) == sorted(str(tmp_path / "data" / s / c) for s in ("train", "val") for c in src.classes)
    # the trials at once that the printed resources, the ETA and Tune all use: the streamed ones
    streamed = plan_resources(find_capacity(None)).streamed_trial_concurrency(cfg.workers_per_trial)
    assert resources.trial_concurrency == streamed and f"up to {streamed} trial(s) at once" in resources.describe()


def test_a_trials_training_stream_is_shuffled_from_the_trials_seed_and_its_val_stream_is_not(monkeypatch):
    from types import SimpleNamespace

    from overinterp.pipeline import stream
    from overinterp.pipeline.trial import TrialSpec

    seeds = {}
    monkeypatch.setattr(stream, "subset_stream", lambda *args, shuffle_seed=None: seeds.setdefault(args[6], shuffle_seed))
    backend = SimpleNamespace(cfg=SimpleNamespace(image_size=8, fraction=0.1), plan=SimpleNamespace(root="r", n_images={"train": 9, "test": 9}),
                              data=SimpleNamespace(path=lambda split: split, classes=None, limits={"train": None, "test": None}))
    stream.StreamBackend._streams(backend, TrialSpec(model="m", seed=7, subset=None), {})
    assert seeds == {"train": 7, "test": None}
