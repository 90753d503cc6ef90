"""Datasets for evaluating a defense: the embedded digits set and local copies of CIFAR-10, GTSRB and
ImageNet-style folders.

Everything here is offline: ``digits`` ships inside scikit-learn; other datasets are read from a path the user
gives (``datasets_local``), and tsc_fast downloads nothing:

    load_dataset("digits")
    load_dataset("cifar10", root="/data/cifar-10-batches-py")   # or the folder above it
    load_dataset("/data/cifar-10-batches-py")                   # layout detected from the folder
    load_dataset("gtsrb", root="/data/GTSRB", size=32)
    load_dataset("imagenet100", root="/data/imagenet100", size=224)   # lazy: train/<class>/, val/<class>/

Images are float32 tensors (N, C, H, W) in [0, 1], labels int64 tensors (N,). Datasets that fit in memory are
kept as :class:`torch.utils.data.TensorDataset` so that attacks and metrics can work on whole tensors at once;
ImageNet-style folders are lazy map-style datasets yielding ``(image, label)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DIGITS_TEST_SIZE = 360  # 1797 images -> 1437 train / 360 test, stratified
DIGITS_MAX_PIXEL = 16.0  # load_digits pixel values are integers 0..16

TensorPair = tuple[torch.Tensor, torch.Tensor]
DataLike = Union[Dataset, TensorPair]


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's fixed train/test split and what a model needs to know about it."""

    name: str
    train: Dataset  # a TensorDataset of (x, y) when the data fit in memory, else a lazy map-style Dataset
    test: Dataset
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...] = ()  # class names where the source provides them

    def train_tensors(self) -> TensorPair:
        """``(x, y)`` of the training split (no copy for a TensorDataset; a lazy dataset is stacked if small)."""
        return tuple(to_tensors(self.train))  # type: ignore[return-value]

    def test_tensors(self) -> TensorPair:
        """``(x, y)`` of the test split (no copy for a TensorDataset; a lazy dataset is stacked if small)."""
        return tuple(to_tensors(self.test))  # type: ignore[return-value]


def load_digits_split(seed: int = 0, test_size: int = DIGITS_TEST_SIZE) -> DatasetSplits:
    """The scikit-learn digits as 1x8x8 images in [0, 1] (pixel / 16), stratified train/test split.

    ``seed`` is the split's ``random_state`` (0 gives the 1437/360 split of CALIBRATION.md).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / DIGITS_MAX_PIXEL)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return DatasetSplits(
        name="digits",
        train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes=10,
        image_shape=(1, 8, 8),
    )


def _local_loader(function_name: str) -> Callable[..., DatasetSplits]:
    """A registry entry that imports ``datasets_local`` only when used (it imports this module)."""

    def load(seed: int = 0, root: Union[str, Path, None] = None, **options) -> DatasetSplits:
        from . import datasets_local

        return getattr(datasets_local, function_name)(root, seed=seed, **options)

    load.__name__ = function_name
    return load


def _load_imagenet100(seed: int = 0, root: Union[str, Path, None] = None, **options) -> DatasetSplits:
    from .datasets_local import load_image_folders

    return load_image_folders(root, seed=seed, name="imagenet100", **options)


# name -> loader(seed=..., **options); local datasets take root=PATH.
DATASET_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "digits": load_digits_split,
    "cifar10": _local_loader("load_cifar10"),
    "gtsrb": _local_loader("load_gtsrb"),
    "imagenet": _local_loader("load_image_folders"),
    "imagenet100": _load_imagenet100,
    "image_folder": _local_loader("load_image_folders"),
}
LOCAL_DATASETS = ("cifar10", "gtsrb", "imagenet", "imagenet100", "image_folder")
LOCAL_LAYOUTS = {
    "cifar10": "the folder holding cifar-10-batches-py (or that folder itself)",
    "gtsrb": "the GTSRB folder holding Final_Training/Images and Final_Test/Images",
    "imagenet": "a folder holding train/<class>/ and val/<class>/ image folders",
    "imagenet100": "a folder holding train/<class>/ and val/<class>/ image folders",
    "image_folder": "a folder holding train/<class>/ and val/<class>/ image folders",
}


def load_dataset(name_or_path: Union[str, Path], seed: int = 0, **options) -> DatasetSplits:
    """Load a dataset by name (``"digits"``; ``"cifar10"``, ``"gtsrb"``, ``"imagenet100"``, ``"image_folder"``
    with ``root=PATH``) or from a folder path whose layout is detected. Nothing is downloaded.

    ``options`` go to the loader (``size=`` for GTSRB and image folders, ``dtype=`` for CIFAR-10 and GTSRB).
    """
    key = str(name_or_path).lower()
    if key in DATASET_LOADERS:
        if key in LOCAL_DATASETS and options.get("root") is None:
            raise ValueError(
                f"dataset {name_or_path!r} is read from a local copy: pass root=PATH, {LOCAL_LAYOUTS[key]} "
                "(a default data location is not yet supported, and tsc_fast downloads nothing)"
            )
        return DATASET_LOADERS[key](seed=seed, **options)
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        from .datasets_local import load_local

        return load_local(path, seed=seed, **options)
    known = ", ".join(sorted(DATASET_LOADERS))
    raise ValueError(
        f"unknown dataset {name_or_path!r}: neither a known name ({known}) nor an existing folder; "
        "tsc_fast downloads nothing"
    )


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's round() rounds halves to even)."""
    return int(math.floor(value + 0.5))


def subset_size(n: int, fraction: float) -> int:
    """Number of items a fraction of ``n`` selects: nearest integer (halves up), at least 1.

    5% of the 1437 digits training images is 71.85 -> 72.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n <= 0:
        raise ValueError("cannot take a subset of an empty dataset")
    return min(n, max(1, round_half_up(fraction * n)))


def class_quotas(class_counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` picks as evenly as possible over classes, capped by each class's size.

    Remainders go to randomly chosen classes; picks a small class cannot fill move to the others.
    """
    quotas = np.zeros_like(class_counts)
    remaining = total
    while remaining > 0:
        open_classes = np.flatnonzero(quotas < class_counts)
        share, extra = divmod(remaining, len(open_classes))
        give = np.full(len(open_classes), share)
        give[rng.permutation(len(open_classes))[:extra]] += 1
        room = class_counts[open_classes] - quotas[open_classes]
        give = np.minimum(give, room)
        quotas[open_classes] += give
        remaining -= int(give.sum())
    return quotas


def subset_indices(
    labels: torch.Tensor | np.ndarray, fraction: float, seed: int = 0, class_balanced: bool = False
) -> np.ndarray:
    """Sorted indices of a random subset of ``subset_size(len(labels), fraction)`` items.

    ``class_balanced=True`` takes (nearly) the same number from every class instead of a uniform draw.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    k = subset_size(len(labels), fraction)
    rng = np.random.default_rng(seed)
    if not class_balanced:
        return np.sort(rng.choice(len(labels), size=k, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = class_quotas(counts, k, rng)
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quotas) if q > 0
    ]
    return np.sort(np.concatenate(picked))


def dataset_labels(data: DataLike) -> torch.Tensor:
    """All labels of a dataset (the second item of each sample) as an int64 tensor."""
    if isinstance(data, tuple):
        return data[1]
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    return torch.as_tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.int64)


def clean_subset(data: DataLike, fraction: float, seed: int = 0, class_balanced: bool = False) -> DataLike:
    """A random ``fraction`` of a clean dataset (the defender's small clean set).

    Accepts an ``(x, y)`` tensor pair (returns a pair), a ``TensorDataset`` (returns a ``TensorDataset``) or any
    map-style Dataset of ``(x, y)`` samples (returns a ``Subset``). Size: ``fraction * n`` rounded to the
    nearest integer, halves up, at least 1 (5% of 1437 -> 72).
    """
    index = subset_indices(dataset_labels(data), fraction, seed=seed, class_balanced=class_balanced)
    index_tensor = torch.from_numpy(index)
    if isinstance(data, tuple):
        return data[0][index_tensor], data[1][index_tensor]
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index_tensor] for t in data.tensors))
    return Subset(data, index.tolist())


def to_tensors(data: DataLike, max_items: int = 200_000) -> TensorPair:
    """Stack a small dataset into ``(x, y)`` tensors; refuses datasets larger than ``max_items``.

    A ``TensorDataset`` of (x, y) and an ``(x, y)`` pair are returned without copying.
    """
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"expected an (x, y) pair, got a tuple of {len(data)} items")
        return data
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (x, y), got {len(data.tensors)} tensors")
        return data.tensors[0], data.tensors[1]
    n = len(data)
    if n > max_items:
        raise ValueError(f"dataset has {n} items, more than max_items={max_items}; iterate it with a DataLoader")
    if n == 0:
        raise ValueError("cannot stack an empty dataset")
    samples = [data[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(s[0]) for s in samples])
    y = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return x, y
