"""Data for accuracy estimation: the built-in digits, or the user's image folder, split reproducibly.

>>> from searchspace.data import load_data
>>> data = load_data()                      # scikit-learn's handwritten digits, nothing downloaded
>>> data.num_classes, data.input_shape, len(data.train), len(data.val)
(10, (1, 32, 32), 1438, 359)
>>> data = load_data("photos/", input_size=96)  # doctest: +SKIP
>>> # photos/cat/1.jpg, photos/dog/2.png, ... : one sub-folder per class

**Digits** (``path=None``): the 1797 8x8 grayscale digits shipped inside scikit-learn, scaled to [0, 1],
upsampled bilinearly to ``input_size`` (default 32) and normalised with the training split's mean and std.
Why 32: a MetaFormer's stem divides the resolution by 4 and three downsamplings by 2 more, so 32 pixels leave
8x8, 4x4, 2x2 and 1x1 tokens in the four stages - every stage still sees at least one token, and training a small
network for a few epochs costs seconds on a 2-core CPU. Larger sizes work (memory: 1797 x size^2 x 4 bytes).

**Image folder** (``path=DIR``): one sub-folder per class (its name is the class name), images in any format PIL
reads (png, jpg, jpeg, bmp, webp, gif, tif, ppm, pgm), also in nested folders; hidden files and other files are
ignored. Each image is converted to RGB, resized so its shorter side is ``input_size`` and centre-cropped to a
square (default 64), then normalised with per-channel statistics of the training split. Folders whose decoded
images fit in ``max_memory_mb`` (default 1024 MB as float32, e.g. about 21,000 images at 64x64) are decoded once
into memory tensors; larger ones are decoded lazily, image by image, when a batch needs them (every file's header
is still checked up front, so a broken file is reported before any training).

The train/validation split is stratified (each class split in the same proportion) and depends only on ``seed``:
the same folder and seed always give the same split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import MixerNASError

DIGITS_INPUT_SIZE = 32  # see the module docstring: 1x1 tokens in the last stage, seconds per epoch on a CPU
FOLDER_INPUT_SIZE = 64  # photos carry more detail than 8x8 digits; 64 keeps 2x2 tokens in the last stage
MIN_INPUT_SIZE = 8  # below this the stem (stride 4) leaves fewer than 2x2 tokens
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
STATS_SAMPLE = 256  # training images used to estimate mean and std when a folder is loaded lazily


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A classification data set split into training and validation parts, ready for an evaluator.

    Samples are ``(image, label)``: a normalised float32 ``(in_chans, input_size, input_size)`` tensor and an int.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int  # 1 for the digits, 3 (RGB) for image folders
    input_size: int  # height = width of every image, in pixels
    class_names: tuple[str, ...]
    source: str  # where the data came from, for reports
    mean: tuple[float, ...]  # per-channel normalisation applied to the images (for preprocessing at deployment)
    std: tuple[float, ...]
    labelled: bool = True  # False: the labels are placeholders (a folder of loose images; see ``unlabelled``)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        return (self.in_chans, self.input_size, self.input_size)

    def describe(self) -> str:
        """One line: ``digits (scikit-learn): 10 classes, 1437 train / 360 val images, 1x32x32``."""
        c, h, w = self.input_shape
        classes = f"{self.num_classes} classes" if self.labelled else "unlabelled"
        return f"{self.source}: {classes}, {len(self.train)} train / {len(self.val)} val images, {c}x{h}x{w}"

    def unlabelled(self) -> DataBundle:
        """The same images without their labels, for training that learns a teacher's outputs instead."""
        return dataclasses.replace(self, labelled=False, source=f"{self.source}, labels unused")


def load_data(path: str | Path | None = None, *, input_size: int | None = None, val_fraction: float = 0.2,
              seed: int = 0, max_memory_mb: float = 1024, allow_unlabelled: bool = False) -> DataBundle:
    """The built-in digits (``path=None``) or an image folder, split into train/val reproducibly by ``seed``.

    Args:
        path: a folder with one sub-folder of images per class; ``None`` for scikit-learn's digits.
        input_size: image side in pixels after resizing (>= 8); ``None`` = 32 for the digits, 64 for a folder.
        val_fraction: share of each class held out for validation, in (0, 1).
        seed: seed of the split; the same data and seed always give the same split.
        max_memory_mb: a folder whose decoded images (float32) fit in this many MB is loaded into memory once;
            a larger one is decoded lazily per image.
        allow_unlabelled: accept a folder of loose images (no class sub-folders) as unlabelled data
            (``labelled=False``); compression distils from a teacher on such images.

    Raises:
        MixerNASError: a missing or malformed folder, an unreadable image, or an invalid argument; the message
            names the problem and what to do.
    """
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise MixerNASError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MixerNASError(f"seed must be an integer, got {seed!r}")
    if path is None:
        return load_digits(input_size=DIGITS_INPUT_SIZE if input_size is None else input_size,
                           val_fraction=val_fraction, seed=seed)
    return load_image_folder(path, input_size=FOLDER_INPUT_SIZE if input_size is None else input_size,
                             val_fraction=val_fraction, seed=seed, max_memory_mb=max_memory_mb,
                             allow_unlabelled=allow_unlabelled)


# ------------------------------------------------------------------------------------------------------- digits


def load_digits(*, input_size: int = DIGITS_INPUT_SIZE, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), 1 channel, upsampled to ``input_size``."""
    from sklearn.datasets import load_digits as sklearn_digits

    _check_input_size(input_size)
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if input_size != images.shape[-1]:
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = stratified_split(labels.tolist(), val_fraction, seed)
    mean, std = _channel_stats(images[train_idx])
    images = _normalise(images, mean, std)
    return DataBundle(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10, in_chans=1, input_size=input_size,
        class_names=tuple(str(i) for i in range(10)), source="digits (scikit-learn)",
        mean=tuple(mean.tolist()), std=tuple(std.tolist()),
    )


# ------------------------------------------------------------------------------------------------- image folder


def load_image_folder(path: str | Path, *, input_size: int = FOLDER_INPUT_SIZE, val_fraction: float = 0.2,
                      seed: int = 0, max_memory_mb: float = 1024, allow_unlabelled: bool = False) -> DataBundle:
    """An image folder (one sub-folder per class) as RGB ``input_size`` squares; see the module docstring.
    With ``allow_unlabelled``, a folder of loose images is unlabelled data (every placeholder label 0)."""
    _check_input_size(input_size)
    root = Path(path).expanduser()
    class_names, files, labels = scan_image_folder(root, allow_unlabelled=allow_unlabelled)
    labelled = bool(class_names)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if not val_idx:
        raise MixerNASError(f"data folder {str(root)!r} has too few images to hold out a validation set (every class "
                            f"has 1 image); add images so that some class has at least 2")
    in_memory = len(files) * 3 * input_size * input_size * 4 <= max_memory_mb * 2**20
    if in_memory:
        images = torch.stack([_read_image(f, input_size) for f in files])  # uint8 (N, 3, S, S)
        images = images.float().div_(255.0)
        mean, std = _channel_stats(images[train_idx])
        images = _normalise(images, mean, std)
        targets = torch.tensor(labels, dtype=torch.int64)
        train: Dataset = TensorDataset(images[train_idx], targets[train_idx])
        val: Dataset = TensorDataset(images[val_idx], targets[val_idx])
    else:
        for f in files:  # headers only: broken files are reported now, not in the middle of a search
            _check_image(f)
        sample = np.random.default_rng(seed).permutation(train_idx)[:STATS_SAMPLE]
        stats_images = torch.stack([_read_image(files[i], input_size) for i in sample]).float().div_(255.0)
        mean, std = _channel_stats(stats_images)
        train = LazyImages([files[i] for i in train_idx], [labels[i] for i in train_idx], input_size, mean, std)
        val = LazyImages([files[i] for i in val_idx], [labels[i] for i in val_idx], input_size, mean, std)
    return DataBundle(
        train=train, val=val, num_classes=len(class_names), in_chans=3, input_size=input_size,
        class_names=tuple(class_names), source=f"image folder {str(root)!r}" + ("" if in_memory else " (lazy)"),
        mean=tuple(mean.tolist()), std=tuple(std.tolist()), labelled=labelled,
    )


def scan_image_folder(root: Path, *, allow_unlabelled: bool = False) -> tuple[list[str], list[Path], list[int]]:
    """``(class_names, files, labels)`` of an image folder, sorted; malformed folders raise MixerNASError.

    With ``allow_unlabelled``, a folder of loose images gives no class names and placeholder labels 0."""
    if not root.exists():
        raise MixerNASError(f"data folder {str(root)!r} does not exist; pass a folder with one sub-folder of images "
                            f"per class (e.g. {str(root / 'cat' / '1.png')!r})")
    if not root.is_dir():
        raise MixerNASError(f"data path {str(root)!r} is a file, not a folder; pass a folder with one sub-folder of "
                            f"images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = sorted(p for p in root.iterdir() if _is_image_file(p) and not p.name.startswith("."))
        if allow_unlabelled and len(loose) >= 2:
            return [], loose, [0] * len(loose)
        found = f" (it holds {len(loose)} images directly)" if loose else ""
        raise MixerNASError(f"data folder {str(root)!r} has no class sub-folders{found}; put the images of each class "
                            f"in a sub-folder named after the class (e.g. {str(root / 'cat' / '1.png')!r})")
    if len(class_dirs) < 2:
        raise MixerNASError(f"data folder {str(root)!r} has only 1 class sub-folder ({class_dirs[0].name!r}); "
                            f"classification needs at least 2 classes, one sub-folder each")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.rglob("*")
                       if _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not found:
            raise MixerNASError(f"class folder {str(class_dir)!r} has no images (looked for "
                                f"{', '.join(IMAGE_EXTENSIONS)}); add images to it or remove it")
        files.extend(found)
        labels.extend([label] * len(found))
    return [d.name for d in class_dirs], files, labels


class LazyImages(Dataset):
    """Image files decoded, resized and normalised one at a time (for folders too large to hold in memory)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], input_size: int, mean: torch.Tensor,
                 std: torch.Tensor):
        self.files, self.labels, self.input_size = list(files), list(labels), input_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _read_image(self.files[index], self.input_size).float().div_(255.0)
        return _normalise(image.unsqueeze(0), self.mean, self.std)[0], self.labels[index]


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 ``(3, size, size)``: RGB, shorter side resized to ``size``, centre-cropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = image.convert("RGBA" if image.mode in ("P", "LA") else image.mode).convert("RGB")
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MixerNASError(f"cannot read image {str(path)!r} ({_reason(exc)}); fix or remove the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MixerNASError(f"cannot read image {str(path)!r} ({_reason(exc)}); fix or remove the file") from None


def _reason(exc: Exception) -> str:
    text = str(exc).split(" '")[0].split("\n")[0]  # PIL repeats the path in its messages
    return text or type(exc).__name__


# ----------------------------------------------------------------------------------------------------- helpers


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted ``(train_indices, val_indices)``; each class keeps about ``val_fraction`` of its items for validation.

    A class with n >= 2 items gives ``round(n * val_fraction)`` of them to validation, at least 1 and at most n - 1;
    a class with one item stays in training. Depends only on the labels, the fraction and the seed.
    """
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels_array):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        n = len(members)
        n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def _check_input_size(input_size: int) -> None:
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < MIN_INPUT_SIZE:
        raise MixerNASError(f"input size must be an integer of at least {MIN_INPUT_SIZE} pixels, got {input_size!r}")


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)  # a constant channel (e.g. grey photos) must not divide by 0
    return mean, std


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
