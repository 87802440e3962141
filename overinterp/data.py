"""Image data sets: every loader yields uint8 images (N, C, H, W), int64 labels, a fixed
train/test split and per-channel normalisation constants.

Masking convention used everywhere downstream: a masked pixel is 0 *after* normalisation, i.e.
the data set's mean colour, on all channels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SPLITS = ("train", "test")


class DataError(ValueError):
    """Bad data-set arguments or files; the message names the fix."""


@dataclass(frozen=True)
class ImageDataset:
    """An in-memory image classification data set.

    images[split]: (N, C, H, W) uint8; labels[split]: (N,) int64.
    mean, std: per-channel normalisation constants in [0, 1] pixel units.
    """

    name: str
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images["train"].shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subsample(self, n_train: int, n_test: int, seed: int = 0) -> "ImageDataset":
        """A smaller copy keeping the first n per split after a seeded shuffle (for smoke runs)."""
        rng = np.random.default_rng(seed)
        images, labels = {}, {}
        for split, n in (("train", n_train), ("test", n_test)):
            idx = np.sort(rng.permutation(len(self.labels[split]))[:n])
            images[split] = self.images[split][idx]
            labels[split] = self.labels[split][idx]
        return ImageDataset(self.name, images, labels, self.mean, self.std, self.classes)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised; 0 is the data set's mean colour."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def denormalize_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Inverse of `normalize`, for pictures: float (N, C, H, W) -> uint8 (N, H, W, C)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    raw = (x.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return raw.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --- digits: the embedded default --------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(root: str | None = None, download: bool = False, image_size: int | None = None) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).

    Split: stratified and fixed — per class, a permutation seeded with DIGITS_SPLIT_SEED puts the
    first ceil(20%) of that class's images in test (364 test, 1,433 train). Pixel values 0..16 are
    scaled to 0..255. Normalisation constants are the train split's mean and std.

    image_size: None keeps 8x8; S upsamples every image bilinearly to SxS (same split, uint8,
    constants from the upsampled train split) — a real, trainable data set at CIFAR's 32x32 cost
    for selection benchmarks. Named "digits{S}" then.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    if image_size is not None:
        images = _upsample_uint8(images, image_size)  # (1797, 1, S, S)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = math.ceil(DIGITS_TEST_FRACTION * len(idx))
        is_test[rng.permutation(idx)[:n_test]] = True
    split_images = {"train": images[~is_test], "test": images[is_test]}
    split_labels = {"train": labels[~is_test], "test": labels[is_test]}
    mean, std = _channel_stats(split_images["train"])
    classes = tuple(str(c) for c in range(10))
    return ImageDataset("digits" if image_size is None else f"digits{image_size}", split_images, split_labels, mean, std, classes)


def _upsample_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bilinear (half-pixel centres), rounded."""
    import torch.nn.functional as F

    if size < 1:
        raise DataError(f"--image-size must be >= 1, got {size}")
    x = torch.from_numpy(images).float()
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).numpy()


# --- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _torchvision_cifar(cls_name: str):
    """torchvision's CIFAR class, checking only that its files exist (not their MD5).

    torchvision verifies the official archives' MD5 sums, which rejects any other batch file; the
    download itself (`--download`) is still MD5-checked by torchvision. A corrupt file fails to unpickle.
    """
    import torchvision.datasets as tvd

    base = getattr(tvd, cls_name)
    return type(
        f"Local{cls_name}",
        (base,),
        {
            "train_list": [[f, None] for f, _ in base.train_list],
            "test_list": [[f, None] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _load_cifar(cls_name: str, root: str | None, download: bool, mean, std, name: str) -> ImageDataset:
    if root is None:
        raise DataError(f"{name} needs --data-root DIR (the folder holding the CIFAR python batches; add --download to fetch them)")
    if not download and not os.path.isdir(root):
        raise DataError(f"--data-root {root} does not exist: point it at the folder holding CIFAR's batches, or add --download")
    cls = _torchvision_cifar(cls_name)
    if download:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(root, train=True, download=True)  # MD5-checked download
    images, labels = {}, {}
    try:
        for split in SPLITS:
            ds = cls(root, train=(split == "train"), download=False)
            images[split] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
            labels[split] = np.asarray(ds.targets, dtype=np.int64)
    except RuntimeError as e:
        raise DataError(f"{name} files not found under --data-root {root} ({e}); add --download to fetch them") from e
    return ImageDataset(name, images, labels, mean, std, tuple(ds.classes))


def load_cifar10(root: str | None = None, download: bool = False, image_size: int | None = None) -> ImageDataset:
    """CIFAR-10 from `root/cifar-10-batches-py` (torchvision's layout), paper normalisation constants."""
    return _load_cifar("CIFAR10", root, download, CIFAR10_MEAN, CIFAR10_STD, "cifar10")


def load_cifar100(root: str | None = None, download: bool = False, image_size: int | None = None) -> ImageDataset:
    """CIFAR-100 (fine labels) from `root/cifar-100-python`."""
    return _load_cifar("CIFAR100", root, download, CIFAR100_MEAN, CIFAR100_STD, "cifar100")


# --- ImageNet-style folders ---------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def resize_center_crop(img, image_size: int) -> np.ndarray:
    """PIL image -> uint8 (3, S, S): resize the shorter side to S·256/224, centre-crop S×S.

    The standard ImageNet evaluation transform (256 -> 224), scaled to any S.
    """
    from PIL import Image

    img = img.convert("RGB")
    short = round(image_size * 256 / 224)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_imagefolder(root: str | None = None, download: bool = False, image_size: int | None = None) -> ImageDataset:
    """An ImageNet-style tree `root/{train,val}/<class>/<image>` held in memory.

    Images are resized and centre-cropped by `resize_center_crop` to `image_size` (default 224);
    ImageNet normalisation constants. Classes are the sorted sub-folder names of `train/`.
    For data sets too big for memory, jobs/sis_imagenet.py streams images with Ray Data instead.
    """
    from PIL import Image

    if root is None:
        raise DataError("imagefolder needs --data-root DIR with train/<class>/ and val/<class>/ sub-folders")
    if download:
        raise DataError("imagefolder cannot be downloaded: drop --download and point --data-root at a local folder")
    size = image_size or 224
    base = Path(root)
    test_dir = "val" if (base / "val").is_dir() else "test"
    for d in ("train", test_dir):
        if not (base / d).is_dir():
            raise DataError(f"--data-root {root} has no {d}/ folder: expected {root}/train/<class>/ and {root}/val/<class>/")
    classes = tuple(sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root}/train has no class sub-folders")
    images, labels = {}, {}
    for split, d in (("train", "train"), ("test", test_dir)):
        imgs, labs = [], []
        for label, cls in enumerate(classes):
            folder = base / d / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    with Image.open(f) as im:
                        imgs.append(resize_center_crop(im, size))
                    labs.append(label)
        if not imgs:
            raise DataError(f"no images found under {root}/{d}/<class>/ (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        images[split] = np.stack(imgs)
        labels[split] = np.asarray(labs, dtype=np.int64)
    return ImageDataset("imagefolder", images, labels, IMAGENET_MEAN, IMAGENET_STD, classes)


# --- registry -----------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
}
NEEDS_ROOT = {"cifar10", "cifar100", "imagefolder"}


def check_dataset_args(name: str, root: str | None, download: bool) -> None:
    """Validate data-set arguments without loading anything; raises DataError naming the fix."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    if name in NEEDS_ROOT and root is None:
        raise DataError(f"data set {name!r} needs --data-root DIR" + (" (or --download)" if name.startswith("cifar") else ""))
    if root is not None and not download and not os.path.isdir(root) and name in NEEDS_ROOT:
        raise DataError(f"--data-root {root} does not exist: create it" + (", or add --download" if name.startswith("cifar") else ""))
    if download and name == "imagefolder":
        raise DataError("imagefolder cannot be downloaded: drop --download")


def load_dataset(name: str, root: str | None = None, download: bool = False, image_size: int | None = None) -> ImageDataset:
    """Load a registered data set by name (see DATASETS)."""
    check_dataset_args(name, root, download)
    return DATASETS[name](root=root, download=download, image_size=image_size)
