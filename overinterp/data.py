"""Image data sets: every loader yields uint8 images (N, C, H, W), int64 labels, a fixed
train/test split and per-channel normalisation constants.

Masking convention used everywhere downstream: a masked pixel is 0 *after* normalisation, i.e.
the data set's mean colour, on all channels.

Files are untrusted input: nothing is unpickled unless it matches a published checksum (CIFAR's
python version), and every bad file is a DataError that names it and says what to do.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
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
    # {split: ((path in the split's folder, reason), ...)} of image files that did not decode (ImageFolder)
    skipped: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

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
        return ImageDataset(self.name, images, labels, self.mean, self.std, self.classes, self.skipped)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised; 0 is the data set's mean colour."""
    import torch  # here, not at the top: Ray Data's decoding workers import this module and need no torch

    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def denormalize_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Inverse of `normalize`, for pictures: float (N, C, H, W) -> uint8 (N, H, W, C)."""
    import torch

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


def load_digits(root: str | None = None, download: bool = False, image_size: int | None = None, strict: bool = False) -> ImageDataset:
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
    import torch
    import torch.nn.functional as F

    if size < 1:
        raise DataError(f"--image-size must be >= 1, got {size}")
    x = torch.from_numpy(images).float()
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).numpy()


# --- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------
#
# Two official on-disk versions, found under --data-root:
# - binary (cifar-10-batches-bin/, cifar-100-binary/): fixed-size records parsed with numpy. Raw
#   bytes cannot run code, so any file with the right structure is accepted (synthetic data too).
# - python (cifar-10-batches-py/, cifar-100-python/): pickles. Unpickling runs whatever code the
#   file names, so every file is checked against the published MD5 sum before anything is
#   unpickled, and a file that does not match is refused. Only the official files pass.
# When both folders are present the binary one is used: it is safe without a checksum.
# --download fetches the python version (torchvision's MD5-checked download) when no binary folder
# is there.

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR_PIXELS = 3 * 32 * 32  # one image: 1024 R, then 1024 G, then 1024 B bytes, rows top to bottom


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR data set's official files live and how its binary records are laid out."""

    name: str  # data set name in DATASETS
    tv_class: str  # torchvision class holding the python version's file names and MD5 sums
    bin_folder: str
    bin_train: tuple[str, ...]
    bin_test: tuple[str, ...]
    bin_names: str  # class names, one per line
    label_ranges: tuple[int, ...]  # per label byte of a record: labels lie in 0..n-1
    bin_url: str

    @property
    def py_folder(self) -> str:
        return self.torchvision_class().base_folder

    def py_files(self) -> list[tuple[str, str]]:
        """(file name, published MD5) of every file the python version unpickles."""
        tv = self.torchvision_class()
        return [(f, md5) for f, md5 in tv.train_list + tv.test_list] + [(tv.meta["filename"], tv.meta["md5"])]

    def torchvision_class(self):
        """The torchvision dataset class (imported lazily: torchvision is slow to import)."""
        import torchvision.datasets as tvd

        return getattr(tvd, self.tv_class)


CIFAR10_LAYOUT = CifarLayout(
    "cifar10", "CIFAR10", "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
    "batches.meta.txt", (10,), "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
)
CIFAR100_LAYOUT = CifarLayout(
    "cifar100", "CIFAR100", "cifar-100-binary", ("train.bin",), ("test.bin",),
    "fine_label_names.txt", (20, 100), "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",  # coarse, fine
)


def read_cifar_binary(path: str, label_ranges: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary batch file -> uint8 images (N, 3, 32, 32) and uint8 labels (N, L).

    A record is L label bytes then CIFAR_PIXELS pixel bytes (planar R, G, B). Raises DataError,
    naming the file, when its length is not a positive whole number of records or a label is out
    of range.
    """
    record = len(label_ranges) + CIFAR_PIXELS
    size = os.path.getsize(path)
    if size == 0 or size % record:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {record}-byte CIFAR records "
            f"({len(label_ranges)} label byte(s) + {CIFAR_PIXELS} pixels): the file is truncated or not CIFAR binary; "
            "replace it with the one from the official binary archive"
        )
    rows = np.fromfile(path, dtype=np.uint8).reshape(-1, record)  # (N, L + 3072)
    labels = rows[:, : len(label_ranges)]
    for j, n in enumerate(label_ranges):
        bad = np.flatnonzero(labels[:, j] >= n)
        if bad.size:
            raise DataError(f"{path}: record {bad[0]} has label byte {j} = {labels[bad[0], j]}, outside 0..{n - 1}: "
                            "the file is corrupt or not this CIFAR version; replace it with the official one")
    images = rows[:, len(label_ranges):].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(images), np.ascontiguousarray(labels)


def _load_cifar_binary(layout: CifarLayout, folder: str) -> tuple[dict, dict, tuple[str, ...]]:
    fix = f"restore it from {layout.bin_url}"
    for f in (*layout.bin_train, *layout.bin_test, layout.bin_names):
        if not os.path.isfile(os.path.join(folder, f)):
            raise DataError(f"{os.path.join(folder, f)} is missing: {fix}, or remove {folder} to use the python version")
    images, labels = {}, {}
    for split, files in (("train", layout.bin_train), ("test", layout.bin_test)):
        parts = [read_cifar_binary(os.path.join(folder, f), layout.label_ranges) for f in files]
        images[split] = np.concatenate([p[0] for p in parts])
        labels[split] = np.concatenate([p[1] for p in parts])[:, -1].astype(np.int64)  # the last byte: fine label
    names_path = os.path.join(folder, layout.bin_names)
    with open(names_path, encoding="utf-8") as f:
        classes = tuple(line.strip() for line in f if line.strip())
    if len(classes) != layout.label_ranges[-1]:
        raise DataError(f"{names_path} lists {len(classes)} class names, not {layout.label_ranges[-1]} (one per line): {fix}")
    return images, labels, classes


def _md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_cifar_python(layout: CifarLayout, folder: str) -> None:
    """Refuse the python version unless every file it unpickles matches its published MD5 sum.

    Reads the files as bytes only; nothing is unpickled. Raises DataError naming the first bad file.
    Other files in the folder (readme.html) are never opened.
    """
    for name, md5 in layout.py_files():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: add --download to fetch {layout.name}, or use the binary version ({layout.bin_url})")
        if _md5(path) != md5:
            raise DataError(
                f"{path} does not match the published MD5 of {layout.name}'s {name}, so it is not unpickled "
                f"(unpickling can run code): add --download to replace it with the official file, "
                f"or use the binary version ({layout.bin_folder}/, {layout.bin_url})"
            )


def _load_cifar_python(layout: CifarLayout, root: str) -> tuple[dict, dict, tuple[str, ...]]:
    verify_cifar_python(layout, os.path.join(root, layout.py_folder))
    cls = layout.torchvision_class()
    images, labels = {}, {}
    for split in SPLITS:
        # torchvision checks every MD5 sum again on each split: with ours, three passes over CIFAR-10's
        # 178 MB, 0.64 s each on this project's 2-core dev box (n=1): small beside training, kept on
        ds = cls(root, train=(split == "train"), download=False)
        images[split] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        labels[split] = np.asarray(ds.targets, dtype=np.int64)
    return images, labels, tuple(ds.classes)


def _load_cifar(layout: CifarLayout, root: str, download: bool, mean, std) -> ImageDataset:
    """The data set under root, which check_dataset_args has checked: given, and existing unless downloading."""
    bin_dir = os.path.join(root, layout.bin_folder)
    if os.path.isdir(bin_dir):
        images, labels, classes = _load_cifar_binary(layout, bin_dir)
    else:
        py_dir = os.path.join(root, layout.py_folder)
        if download:
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                verify_cifar_python(layout, py_dir)
            except DataError:  # missing or not official: fetch the archive (torchvision checks its MD5)
                tv = layout.torchvision_class()
                download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)
        elif not os.path.isdir(py_dir):
            raise DataError(f"--data-root {root} holds neither {layout.py_folder}/ nor {layout.bin_folder}/: "
                            "add --download to fetch the python version, or point --data-root at the folder holding one")
        images, labels, classes = _load_cifar_python(layout, root)
    return ImageDataset(layout.name, images, labels, mean, std, classes)


def load_cifar10(root: str | None = None, download: bool = False, image_size: int | None = None, strict: bool = False) -> ImageDataset:
    """CIFAR-10 from `root/cifar-10-batches-bin` or `root/cifar-10-batches-py`; paper normalisation.

    Every problem with CIFAR's files is fatal, so `strict` changes nothing here.
    """
    return _load_cifar(CIFAR10_LAYOUT, root, download, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(root: str | None = None, download: bool = False, image_size: int | None = None, strict: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) from `root/cifar-100-binary` or `root/cifar-100-python`."""
    return _load_cifar(CIFAR100_LAYOUT, root, download, CIFAR100_MEAN, CIFAR100_STD)


# --- ImageNet-style folders ---------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HIDDEN_PREFIXES = (".", "_")  # class folders Ray Data's file listing skips; we skip them too


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (any case), as Ray Data's filter matches it."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (3, S, S) by `resize_center_crop`; raises if not fully decodable.

    `load()` decodes every byte now, so a truncated file raises here instead of decoding partially
    (that relies on PIL's ImageFile.LOAD_TRUNCATED_IMAGES being False, its default).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return resize_center_crop(im, image_size)


def decode_failure(e: Exception) -> str:
    """A short one-line reason for a failed `decode_image`."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can read"
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def skipped_summary(skipped: tuple[tuple[str, str], ...] | list, first: int = 10) -> dict:
    """For summary.json: {"count": n, "first": [{"path", "reason"}, ...]} of skipped images."""
    return {"count": len(skipped), "first": [{"path": p, "reason": r} for p, r in list(skipped)[:first]]}


def skipped_line(skipped: tuple[tuple[str, str], ...] | list, first: int = 3) -> str:
    """For the log: one line counting skipped images and naming the first few with their reasons."""
    listed = "; ".join(f"{p} ({r})" for p, r in list(skipped)[:first])
    more = f"; and {len(skipped) - first} more" if len(skipped) > first else ""
    return f"skipped {len(skipped)} image(s) that could not be decoded: {listed}{more} (--strict makes this fatal)"


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(HIDDEN_PREFIXES))


def _image_files(folder: Path) -> list[Path]:
    """Image files under a class folder, recursively (like Ray Data and torchvision's ImageFolder)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


def load_imagefolder(root: str | None = None, download: bool = False, image_size: int | None = None, strict: bool = False) -> ImageDataset:
    """An ImageNet-style tree `root/{train,val}/<class>/<image>` held in memory.

    Images are resized and centre-cropped by `resize_center_crop` to `image_size` (default 224);
    ImageNet normalisation constants. Classes are the sorted sub-folder names of `train/`.
    The layout is checked before anything is decoded: a class folder with no image files, a class
    of val/ that train/ lacks, or a split with no images is a DataError naming the folder.
    A file with an image extension that does not decode is skipped and recorded in `skipped`
    (per split: path relative to the split's folder, reason), or with `strict` raises a DataError naming it.
    Data sets too big for memory are streamed through Ray Data instead (`--stream`).
    """
    base = Path(root)  # given, and not to be downloaded (check_dataset_args)
    test_dir = "val" if (base / "val").is_dir() else "test"
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    for d in ("train", test_dir):
        if not (base / d).is_dir():
            raise DataError(f"--data-root {root} has no {d}/ folder: {layout}")
    return load_imagefolder_splits(str(base / "train"), str(base / test_dir), image_size, strict)


def load_imagefolder_splits(train: str, val: str, image_size: int | None = None, strict: bool = False) -> ImageDataset:
    """Two ImageFolder splits, <train>/<class>/<image> and <val>/<class>/<image>, held in memory
    (`load_imagefolder` for the rules); paths in messages are relative to their parent, in `skipped`
    to their split's folder (as a streamed run records them)."""
    size = image_size or 224
    split_dirs = {"train": Path(train), "test": Path(val)}
    base = Path(os.path.commonpath([train, val]))
    root = str(base)
    layout = f"expected {train}/<class>/<image> and {val}/<class>/<image>"
    classes = tuple(_class_folders(split_dirs["train"]))
    if not classes:
        raise DataError(f"{train} has no class sub-folders: {layout}")
    if len(classes) == 1:
        raise DataError(f"{train} has one class folder ({classes[0]}): a classifier needs at least 2: {layout}")
    files: dict[str, list[tuple[int, Path]]] = {}
    dirs = [(split, d.relative_to(base).as_posix()) for split, d in split_dirs.items()]
    for split, d in dirs:
        present = _class_folders(base / d)
        for cls in present:
            if cls not in classes:
                raise DataError(f"{root}/{d}/{cls}: class folder {cls!r} is not among the train classes: remove it, or add {root}/train/{cls}/")
        files[split] = []
        for cls in present:
            found = _image_files(base / d / cls)
            if not found:
                raise DataError(f"{root}/{d}/{cls} holds no images ({', '.join(IMAGE_EXTENSIONS)}): remove it, or add images")
            files[split] += [(classes.index(cls), f) for f in found]
        if not files[split]:
            raise DataError(f"no images under {root}/{d}/: {layout}")

    images, labels, skipped = {}, {}, {}
    for split, d in dirs:
        imgs, labs, skipped[split] = [], [], []
        for label, f in files[split]:
            try:
                imgs.append(decode_image(f.read_bytes(), size))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
                if strict:
                    raise DataError(f"{f}: cannot decode ({decode_failure(e)}): remove the file, or drop --strict to skip it") from e
                skipped[split].append((f.relative_to(split_dirs[split]).as_posix(), decode_failure(e)))
            else:
                labs.append(label)
        labs = np.asarray(labs, dtype=np.int64)
        n_files = np.bincount([label for label, _ in files[split]], minlength=len(classes))
        dead = np.flatnonzero((n_files > 0) & (np.bincount(labs, minlength=len(classes)) == 0))
        if dead.size:  # a class folder whose every image was skipped
            cls = classes[dead[0]]
            first = next(f"{d}/{p}" for p, _ in skipped[split] if p.startswith(f"{cls}/"))
            raise DataError(f"{root}/{d}/{cls}: none of its {n_files[dead[0]]} images could be decoded (first: {first}): fix or remove them")
        images[split] = np.stack(imgs)
        labels[split] = labs
    for split, d in dirs:
        if skipped[split]:
            logging.getLogger(__name__).warning("%s/%s: %s", root, d, skipped_line(skipped[split]))
    return ImageDataset("imagefolder", images, labels, IMAGENET_MEAN, IMAGENET_STD, classes, {s: tuple(v) for s, v in skipped.items()})


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
        if download:
            raise DataError(f"--download needs --data-root DIR: the folder to download {name} into")
        raise DataError(f"data set {name!r} needs --data-root DIR" + (" (or --download)" if name.startswith("cifar") else ""))
    if root is not None and name not in NEEDS_ROOT:
        raise DataError(f"{name} is built in and takes no --data-root: drop it, or name the data set in it with --dataset "
                        "cifar10|cifar100|imagefolder|parquet")
    if download and not name.startswith("cifar"):
        raise DataError(f"{name} cannot be downloaded: drop --download")
    if root is not None and os.path.isfile(root):
        raise DataError(f"--data-root {root} is a file: give the folder that holds the {name} data set")
    if root is not None and not download and not os.path.isdir(root):
        raise DataError(f"--data-root {root} does not exist: create it" + (", or add --download" if name.startswith("cifar") else ""))


def load_dataset(name: str, root: str | None = None, download: bool = False, image_size: int | None = None,
                 strict: bool = False) -> ImageDataset:
    """Load a registered data set by name (see DATASETS).

    strict: make an image file that does not decode fatal instead of skipping it (`--strict`).
    """
    check_dataset_args(name, root, download)
    return DATASETS[name](root=root, download=download, image_size=image_size, strict=strict)
