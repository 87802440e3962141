"""Training on full and masked images; augmentation moves masks with their images."""

import pytest
import torch

from overinterp.data import load_digits
from overinterp.models import build, ModelSpec
from overinterp.selection import apply_mask
from overinterp.training import TrainConfig, augment_batch, black, evaluate, prepare, train_model


def test_augmentation_moves_the_mask_with_the_image():
    x = torch.arange(1, 1 + 4 * 3 * 6 * 6, dtype=torch.float32).view(4, 3, 6, 6)  # no zero pixel
    keep = torch.rand(4, 36, generator=torch.Generator().manual_seed(0)) < 0.5
    out = augment_batch(apply_mask(x, keep), torch.Generator().manual_seed(7), pad=2)
    moved_keep = augment_batch(keep.view(4, 1, 6, 6).float(), torch.Generator().manual_seed(7), pad=2)
    moved_x = augment_batch(x, torch.Generator().manual_seed(7), pad=2)
    assert torch.equal(out, moved_x * moved_keep)  # the same crop/flip applied to both
    assert torch.equal((out != 0).all(1), moved_keep[:, 0].bool() & (moved_x != 0).all(1))


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = torch.randn(8, 1, 5, 5)
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(8):
        windows = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)


def test_full_images_are_padded_black_and_subsets_with_removed_pixels(monkeypatch):
    mean, std = (0.5, 0.25), (0.25, 0.5)
    assert black(mean, std) == (-2.0, -0.5)  # uint8 0 normalised
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2, border=black(mean, std))
    padded = torch.stack([torch.nn.functional.pad(x[:, c], (2, 2, 2, 2), value=v) for c, v in enumerate(black(mean, std))], 1)
    for b in range(8):  # the same crop as a photo padded with black before normalising
        windows = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)
    assert (out[:, 0] == -2.0).any() and (out[:, 1] == -0.5).any()  # some crops show the padding
    # train_model pads a full image black, a subset's with 0 (removed pixels), whatever its fill
    import overinterp.training as training

    borders = []
    monkeypatch.setattr(training, "augment_batch", lambda x, gen, border=None: borders.append(border) or x)
    images, labels = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    model = build(ModelSpec("digits_cnn", 2, 1))
    config = TrainConfig(epochs=1, batch_size=4, augment=True)
    train_model(model, images, labels, (0.5,), (0.25,), config)
    train_model(model, images, labels, (0.5,), (0.25,), config, keep=torch.ones(4, 16, dtype=torch.bool), fill="road")
    assert borders == [(-2.0,), None]


def test_prepare_masks_to_zero():
    imgs = torch.full((1, 2, 2, 2), 200, dtype=torch.uint8)
    keep = torch.tensor([[True, False, False, True]])
    x = prepare(imgs, (0.1, 0.2), (0.5, 0.5), keep)
    assert x[0, :, 0, 1].tolist() == [0.0, 0.0] and x[0, :, 0, 0].ne(0).all()


@pytest.fixture(scope="module")
def digits_small():
    d = load_digits().subsample(400, 200)
    t = lambda a: torch.from_numpy(a)
    return d, t(d.images["train"]), t(d.labels["train"]), t(d.images["test"]), t(d.labels["test"])


def test_training_learns_and_is_seeded(digits_small):
    d, xtr, ytr, xte, yte = digits_small
    cfg = TrainConfig(epochs=15, lr=0.05, seed=3)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build(ModelSpec("digits_cnn", 10, 1))
        losses = train_model(m, xtr, ytr, d.mean, d.std, cfg)
        models.append(m)
    assert losses[-1] < losses[0]
    assert evaluate(models[0], xte, yte, d.mean, d.std) > 0.85
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def _trained(d, images, labels, keep=None, fill="mean", epochs=2) -> list[torch.Tensor]:
    """The parameters of a digits_cnn trained from one seed."""
    torch.manual_seed(0)
    m = build(ModelSpec("digits_cnn", 10, 1))
    train_model(m, images, labels, d.mean, d.std, TrainConfig(epochs=epochs, lr=0.05), keep, fill=fill)
    return [p.detach().clone() for p in m.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_training_on_masks_sees_only_kept_pixels(digits_small):
    d, xtr, ytr, xte, yte = digits_small
    keep = torch.zeros(len(ytr), 64, dtype=torch.bool)
    keep[:, :8] = True  # only the top row
    other = xtr.clone()
    other.view(len(ytr), -1)[:, 8:] = 255 - other.view(len(ytr), -1)[:, 8:]  # every pixel outside the mask changed
    masked = _trained(d, xtr, ytr, keep)
    assert _same(masked, _trained(d, other, ytr, keep))  # training never saw the removed pixels
    assert not _same(masked, _trained(d, xtr, ytr))  # and the mask did take effect
    torch.manual_seed(0)
    m = build(ModelSpec("digits_cnn", 10, 1))
    train_model(m, xtr, ytr, d.mean, d.std, TrainConfig(epochs=2, lr=0.05), keep)
    # evaluation under the same mask equals evaluation on images whose other pixels are the mean
    other = xte.clone()
    other.view(len(yte), -1)[:, 8:] = 0  # raw change hidden by the mask
    k = keep[:1].expand(len(yte), 64)
    assert evaluate(m, xte, yte, d.mean, d.std, k) == evaluate(m, other, yte, d.mean, d.std, k)


def test_train_config_validation():
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(milestones=(60, 120))
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)


def test_a_trailing_single_image_batch_is_skipped():
    # 9 images at batch 8: the last batch of 1 would break BatchNorm in training mode
    torch.manual_seed(0)
    m = build(ModelSpec("resnet20", 3, 1))
    x = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8)
    sizes = []
    m.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    losses = train_model(m, x, torch.arange(9) % 3, (0.5,), (0.25,), TrainConfig(epochs=2, batch_size=8, lr=0.01))
    assert len(losses) == 2 and all(l == l for l in losses)  # finite, no error
    assert sizes == [8, 8]  # each epoch trained on its batch of 8 and left its batch of 1 out


def test_positions_only_sees_the_mask_not_the_pixels(digits_small):
    d, xtr, ytr, xte, yte = digits_small
    keep = torch.rand(len(ytr), 64, generator=torch.Generator().manual_seed(0)) < 0.1
    x = prepare(xtr, d.mean, d.std, keep, fill="positions")
    assert torch.equal(x[:, 0].reshape(len(ytr), 64), keep.float())  # exactly the mask
    assert torch.equal(x, prepare(255 - xtr, d.mean, d.std, keep, fill="positions"))  # pixel values play no part
    positions = _trained(d, xtr, ytr, keep, fill="positions", epochs=1)
    assert _same(positions, _trained(d, 255 - xtr, ytr, keep, fill="positions", epochs=1))  # trained on the mask alone
    assert not _same(positions, _trained(d, xtr, ytr, keep, epochs=1))  # not on the kept pixels' values
    torch.manual_seed(0)
    m = build(ModelSpec("digits_cnn", 10, 1))
    train_model(m, xtr, ytr, d.mean, d.std, TrainConfig(epochs=1, lr=0.05), keep, fill="positions")
    k = keep[:len(yte)]
    assert evaluate(m, xte, yte, d.mean, d.std, k, fill="positions") == evaluate(m, 255 - xte, yte, d.mean, d.std, k, fill="positions")


def test_road_fill_keeps_kept_pixels_and_predictions_do_not_depend_on_batch_size():
    imgs = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    keep = torch.rand(5, 36, generator=torch.Generator().manual_seed(4)) < 0.3
    mean, std = (0.4,), (0.3,)
    x = prepare(imgs, mean, std, keep, fill="road", seeds=range(5))
    full = prepare(imgs, mean, std, None)
    k4 = keep.view(5, 1, 6, 6)
    assert torch.equal(x[k4], full[k4])  # kept pixels bit for bit
    assert (x[~k4] != 0).all()  # removed pixels imputed, not the mean colour
    assert torch.equal(x, prepare(imgs, mean, std, keep, fill="road", seeds=range(5)))  # seeded: reproducible
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    a = torch.tensor([0, 1, 2, 0, 1])
    from overinterp.training import predict

    assert torch.equal(predict(m, imgs, mean, std, keep, batch_size=2, fill="road"),
                       predict(m, imgs, mean, std, keep, batch_size=5, fill="road"))
    torch.manual_seed(0)
    losses = train_model(m, imgs, a, mean, std, TrainConfig(epochs=2, batch_size=4, lr=0.01, augment=False), keep, fill="road")
    assert len(losses) == 2 and all(l == l for l in losses)


def test_class_confidence_is_the_softmax_of_the_target_class():
    from overinterp.training import class_confidence

    imgs = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    target = torch.tensor([0, 1, 2, 2, 1])
    keep = torch.rand(5, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    got = class_confidence(m, imgs, (0.5,), (0.2,), target, keep, batch_size=2)
    want = torch.softmax(m(prepare(imgs, (0.5,), (0.2,), keep)).double(), 1)[torch.arange(5), target]
    assert torch.allclose(got, want)
