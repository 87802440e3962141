"""InMemoryBackend's memoised store reads (pipeline/run.py), without Ray: the random baseline's
rows are the cheapest selection to store by hand. The whole summary phase's reads are counted on
the smoke run in test_pipeline.py."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from overinterp import store
from overinterp.config import RunConfig
from overinterp.pipeline.run import InMemoryBackend

TAG = "random-seed0"


@pytest.fixture
def backend(tmp_path, monkeypatch):
    """A backend over a store holding the random baseline of 5 test images (ids 0..4), and a
    Counter of store.read_selections calls by (model, selector, split)."""
    root = str(tmp_path / "selections")
    store.write_rows(root, model="none", selector=TAG, selector_params='{"seed": 0}', split="test",
                     image_id=np.arange(5), label=np.zeros(5, dtype=np.int64), height=4, width=4)
    data = SimpleNamespace(images={}, labels={}, mean=0.0, std=1.0, num_classes=10)
    b = InMemoryBackend(RunConfig(smoke=True).resolved(), SimpleNamespace(root=root), data, SimpleNamespace(use_gpu=False))
    reads, real = Counter(), store.read_selections
    monkeypatch.setattr(store, "read_selections", lambda root, model, sel, split, *a, **kw: (
        reads.update([(model, sel, split)]), real(root, model, sel, split, *a, **kw))[1])
    return b, reads


def test_each_selection_is_read_once(backend):
    b, reads = backend
    first = b._selections("none", TAG, "test", 5)
    assert b._selections("none", TAG, "test") is first and b._selections("none", TAG, "test", 5) is first
    assert reads == {("none", TAG, "test"): 1}
    assert first.order.shape == (5, 16)


def test_a_count_given_later_is_still_checked(backend):
    b, reads = backend
    b._selections("none", TAG, "test")  # no count: as the plots ask
    with pytest.raises(store.StoreError, match="holds 5 of 6 images: rerun the selection stage"):
        b._selections("none", TAG, "test", 6)
    assert b._selections("none", TAG, "test", 5).image_id.tolist() == [0, 1, 2, 3, 4]
    assert reads == {("none", TAG, "test"): 1}  # checked on the cached rows, not read again


def test_a_count_given_first_is_checked_by_the_store(backend):
    b, _ = backend
    with pytest.raises(store.StoreError, match="holds 5 of 6 images"):
        b._selections("none", TAG, "test", 6)
