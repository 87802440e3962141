"""Model registry, ensembles, input dropout, checkpoints, torchvision weights from a file."""

import hashlib

import pytest
import torch

from overinterp.models import (
    InputDropout,
    MeanEnsemble,
    ModelError,
    ModelSpec,
    build,
    check_model_name,
    create_model,
    load_checkpoint,
    load_ensemble,
    save_checkpoint,
)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "resnet18", "vgg16_bn", "wrn28_10"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_small_models_shapes(name, shape):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert m(torch.randn(2, *shape)).shape == (2, 7)


def test_resnet20_has_option_a_shortcuts_and_paper_size():
    m = create_model("resnet20", 10)
    n_params = sum(p.numel() for p in m.parameters())
    assert 0.26e6 < n_params < 0.28e6  # the CIFAR ResNet20 has ~0.27M parameters
    assert not any(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (1, 1) for x in m.modules())


def test_wrn28_10_has_the_papers_shape():
    m = create_model("wrn28_10", 10)
    n_params = sum(p.numel() for p in m.parameters())
    assert 36.4e6 < n_params < 36.6e6  # WRN-28-10 has ~36.5M parameters (Zagoruyko & Komodakis, Table 1)
    blocks = [b for b in m.modules() if type(b).__name__ == "WideBlock"]
    assert len(blocks) == 12 and [b.conv2.out_channels for b in blocks[::4]] == [160, 320, 640]  # 4 blocks per group
    assert all(b.dropout.p == 0.3 for b in blocks)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))  # dropout is off at evaluation: selection sees one model


def test_unknown_model_names_the_fix():
    with pytest.raises(ModelError, match="tv:<name>"):
        check_model_name("resnet21")
    with pytest.raises(ModelError, match="3-channel"):
        create_model("tv:resnet18", 10, in_channels=1)


def test_torchvision_model_with_local_weights(tmp_path):
    torch.manual_seed(0)
    src = create_model("tv:resnet18", num_classes=5).eval()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = create_model("tv:resnet18", num_classes=5, weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    with pytest.raises(ModelError, match="does not fit"):
        create_model("tv:resnet18", num_classes=3, weights=str(path))
    with pytest.raises(ModelError, match="neither a file nor"):
        create_model("tv:resnet18", num_classes=1000, weights="NoSuch_Weights.X")


def test_small_model_with_local_weights_bare_or_in_a_checkpoint(tmp_path):
    """A registered small model explained with --weights FILE: a bare state_dict, or overinterp's own
    checkpoint (its state_dict under "state_dict"); a weights name is refused, it has none."""
    torch.manual_seed(0)
    src = create_model("digits_cnn", num_classes=4, in_channels=3).eval()
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    save_checkpoint(str(tmp_path / "ckpt.pt"), ModelSpec("digits_cnn", 4, 3), src)
    x = torch.randn(2, 3, 8, 8)
    for name in ("bare.pt", "ckpt.pt"):
        dst = create_model("digits_cnn", num_classes=4, in_channels=3, weights=str(tmp_path / name)).eval()
        with torch.no_grad():
            assert torch.equal(src(x), dst(x)), name
    with pytest.raises(ModelError, match=r"does not fit digits_cnn with 5 classes \(other shapes for fc.weight, fc.bias\)"):
        create_model("digits_cnn", num_classes=5, weights=str(tmp_path / "bare.pt"))
    with pytest.raises(ModelError, match="digits_cnn has no named weights: give --weights a state_dict file"):
        create_model("digits_cnn", num_classes=4, weights="DEFAULT")


def test_weights_that_do_not_fit_or_load_say_what_and_how(tmp_path):
    torch.save(create_model("resnet20", num_classes=4).state_dict(), tmp_path / "resnet20.pt")
    with pytest.raises(ModelError) as e:
        create_model("digits_cnn", num_classes=4, in_channels=3, weights=str(tmp_path / "resnet20.pt"))
    text = str(e.value)
    assert "(missing conv1.weight, conv1.bias, conv2.weight and 1 more; unexpected stem.0.weight, stem.1.weight, stem.1.bias and 111 more;" in text
    assert "give the state_dict of a digits_cnn with 4 classes" in text
    # a state_dict without BatchNorm's num_batches_tracked loads, as torch loads it
    src = create_model("resnet20", num_classes=4).eval()
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}, tmp_path / "older.pt")
    dst = create_model("resnet20", num_classes=4, weights=str(tmp_path / "older.pt")).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    (tmp_path / "notes.pt").write_text("not a torch file")
    with pytest.raises(ModelError) as e:
        create_model("digits_cnn", num_classes=4, weights=str(tmp_path / "notes.pt"))
    assert "save model.state_dict() with torch.save" in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(ModelError, match="are ResNet50_Weights, not resnet18's: give one of ResNet18_Weights's"):
        create_model("tv:resnet18", num_classes=1000, weights="ResNet50_Weights.IMAGENET1K_V2")  # refused before any download


def test_input_dropout_train_drops_whole_pixels_eval_is_identity():
    class Probe(torch.nn.Module):
        def forward(self, x):
            self.seen = x
            return x.flatten(1)

    base = Probe()
    m = InputDropout(base, p=0.5)
    x = torch.ones(64, 3, 8, 8)
    m.train()
    m(x)
    seen = base.seen
    assert torch.equal(seen[:, 0], seen[:, 1]) and torch.equal(seen[:, 0], seen[:, 2])  # all channels together
    assert set(seen.unique().tolist()) == {0.0, 1.0}  # dropped = 0 (mean), kept unscaled
    assert 0.4 < float((seen == 0).float().mean()) < 0.6
    m.eval()
    out1, out2 = m(x), m(x)
    assert torch.equal(out1, out2) and torch.equal(out1, x.flatten(1))  # deterministic identity at evaluation
    with pytest.raises(ValueError):
        InputDropout(base, p=1.0)


def test_mean_ensemble_averages_logits():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e = MeanEnsemble([a, b])
    x = torch.randn(4, 3)
    assert torch.allclose(e(x), (a(x) + b(x)) / 2)


def test_checkpoint_roundtrip_and_ensemble(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("digits_cnn", 10, 1, input_dropout=0.2)
    m = build(spec).eval()
    p1, p2 = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    assert save_checkpoint(p1, spec, m) == hashlib.sha256(open(p1, "rb").read()).hexdigest()  # the bytes on disk
    save_checkpoint(p2, spec, build(spec))
    loaded = load_checkpoint(p1)
    assert isinstance(loaded, InputDropout) and not loaded.training
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
        ens = load_ensemble([p1, p2])
        assert isinstance(ens, MeanEnsemble)
        assert torch.allclose(ens(x), (loaded(x) + load_checkpoint(p2)(x)) / 2)


def test_torchvision_weights_enum_is_resolved_before_any_download():
    # a real enum name, checked against the data set's classes without fetching anything
    with pytest.raises(ModelError, match="predict 1000 classes, the data set has 10: give --weights a state_dict file of resnet18 trained on these 10"):
        create_model("tv:resnet18", num_classes=10, weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ModelError, match="predict 1000 classes"):
        create_model("tv:resnet18", num_classes=10, weights="DEFAULT")


class _Payload:
    """Unpickling this creates a marker file (builtins.open, no shell): proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _cached_weights_path(tmp_path, monkeypatch, enum_name: str) -> str:
    import os
    from urllib.parse import urlparse

    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = tvm.get_weight(enum_name).url
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    path.parent.mkdir(parents=True)
    return str(path)


def test_named_weights_with_a_crafted_pickle_are_refused_and_never_executed(tmp_path, monkeypatch):
    import pickle

    path = _cached_weights_path(tmp_path, monkeypatch, "ResNet18_Weights.IMAGENET1K_V1")
    marker = tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Payload(str(marker))}, f)
    with pytest.raises(ModelError) as e:
        create_model("tv:resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"the cached weights {path} are not a state_dict torch can load safely")
    assert msg.endswith("delete the file so that it is downloaded again")
    assert not marker.exists()


def test_named_weights_load_from_the_cache(tmp_path, monkeypatch):
    """The happy path without a download: a genuine state_dict under the cached file's name. Its
    hash does not match the name's prefix, and it loads anyway: torch.hub checks the hash only when
    it downloads (check_hash=True), so a cached file is trusted for its content; weights_only=True
    is what keeps a planted one from running code (the test above)."""
    import torchvision.models as tvm

    path = _cached_weights_path(tmp_path, monkeypatch, "ResNet18_Weights.IMAGENET1K_V1")
    src = tvm.resnet18(num_classes=1000)
    torch.save(src.state_dict(), path)
    dst = create_model("tv:resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_googlenet_named_weights_get_the_builders_kwargs(tmp_path, monkeypatch):
    """As torchvision's builder does with weights: transform_input on, the auxiliary heads loaded
    from the file and then dropped."""
    import torchvision.models as tvm

    path = _cached_weights_path(tmp_path, monkeypatch, "GoogLeNet_Weights.IMAGENET1K_V1")
    src = tvm.GoogLeNet(num_classes=1000, aux_logits=True, transform_input=True, init_weights=False)
    torch.save(src.state_dict(), path)
    dst = create_model("tv:googlenet", num_classes=1000, weights="GoogLeNet_Weights.IMAGENET1K_V1").eval()
    assert dst.transform_input and not dst.aux_logits and dst.aux1 is None and dst.aux2 is None
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(src.eval()(x), dst(x))


def test_named_weights_that_do_not_fit_are_one_line(tmp_path, monkeypatch):
    import torchvision.models as tvm

    path = _cached_weights_path(tmp_path, monkeypatch, "ResNet18_Weights.IMAGENET1K_V1")
    torch.save(tvm.resnet34(num_classes=1000).state_dict(), path)
    with pytest.raises(ModelError, match=r"^the cached weights .* do not fit resnet18: .*delete the file") as e:
        create_model("tv:resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert "\n" not in str(e.value)
