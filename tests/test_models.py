"""Model registry, ensembles, input dropout, checkpoints, torchvision weights from a file."""

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


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "resnet18", "vgg16_bn"])
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
    save_checkpoint(p1, spec, m)
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
    with pytest.raises(ModelError, match="predict 1000 classes, the data set has 10"):
        create_model("tv:resnet18", num_classes=10, weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ModelError, match="predict 1000 classes"):
        create_model("tv:resnet18", num_classes=10, weights="DEFAULT")
