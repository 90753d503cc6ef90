"""A dataset's fixed train/test split (``DatasetSplits``), image resizing, and the defender's clean subsets.

Images are float32 tensors (N, C, H, W) in [0, 1], labels int64 tensors (N,). Datasets that fit in memory are kept
as :class:`torch.utils.data.TensorDataset`; large image folders are lazy map-style datasets yielding
``(image, label)``. A source without a test split has ``DatasetSplits.test = None``; ``DatasetSplits.layout``
says in words what was read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..batches import to_tensors

RESIZE_CHUNK = 1024  # images interpolated at once: bounds the float copy of a uint8 dataset

TensorPair = tuple[torch.Tensor, torch.Tensor]
DataLike = Union[Dataset, TensorPair]


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's fixed train/test split and what a model needs to know about it.

    ``test`` is None when the source has no test split (a folder of class folders, an ``.npz`` without
    ``x_test``); ``layout`` describes in words what was read (for the command line's output and reports).
    """

    name: str
    train: Dataset  # a TensorDataset of (x, y) when the data fit in memory, else a lazy map-style Dataset
    test: Optional[Dataset]
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...] = ()  # class names where the source provides them
    layout: str = ""

    @property
    def has_test(self) -> bool:
        return self.test is not None

    def train_tensors(self) -> TensorPair:
        """``(x, y)`` of the training split (no copy for a TensorDataset; a lazy dataset is stacked if small)."""
        return tuple(to_tensors(self.train))  # type: ignore[return-value]

    def test_tensors(self) -> TensorPair:
        """``(x, y)`` of the test split (no copy for a TensorDataset; a lazy dataset is stacked if small).

        Raises ValueError when the source has no test split.
        """
        if self.test is None:
            where = f" ({self.layout})" if self.layout else ""
            raise ValueError(
                f"dataset {self.name!r} has no test split{where}: give image folders a test/ or val/ folder, "
                "x_test and y_test arrays to an .npz file, or hold out part of the training split"
            )
        return tuple(to_tensors(self.test))  # type: ignore[return-value]


# --- image sizes --------------------------------------------------------------------------------------------------


def pick_image_size(image_size: Optional[int] = None, size: Optional[int] = None) -> Optional[int]:
    """The one image size a loader was asked for: ``image_size``, or its older spelling ``size`` (not both)."""
    if image_size is not None and size is not None and image_size != size:
        raise ValueError(f"image_size={image_size} and size={size} disagree: pass only image_size")
    chosen = image_size if image_size is not None else size
    if chosen is None:
        return None
    if isinstance(chosen, bool) or int(chosen) != chosen or chosen < 1:
        raise ValueError(f"image_size must be a positive integer, got {chosen!r}")
    return int(chosen)


def resize_images(images: torch.Tensor, image_size: Optional[int]) -> torch.Tensor:
    """(N, C, H, W) images resized to ``image_size`` x ``image_size`` (bilinear, antialiased when shrinking).

    Float images stay in [0, 1]; uint8 images are resized in float and rounded back. ``None`` or the images'
    own size returns ``images`` unchanged.
    """
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    shrinking = image_size < images.shape[-2] or image_size < images.shape[-1]
    is_uint8 = images.dtype == torch.uint8
    parts = []
    for start in range(0, len(images), RESIZE_CHUNK):  # chunks: a uint8 dataset is never all in float at once
        part = images[start:start + RESIZE_CHUNK]
        part = part.float() if is_uint8 else part
        part = torch.nn.functional.interpolate(part, size=(image_size, image_size), mode="bilinear",
                                               align_corners=False, antialias=shrinking)
        # bilinear weights are convex, so only float rounding can step outside the input range
        parts.append(part.round().clamp_(0, 255).to(torch.uint8) if is_uint8 else part.clamp_(0.0, 1.0))
    if not parts:
        return images.new_empty((0, images.shape[1], image_size, image_size))
    return torch.cat(parts)


def resize_splits(splits: DatasetSplits, image_size: Optional[int]) -> DatasetSplits:
    """In-memory splits with their images resized (see :func:`resize_images`); the layout notes the resize."""
    if image_size is None or splits.image_shape[1:] == (image_size, image_size):
        return splits

    def resized(dataset: Optional[Dataset]) -> Optional[Dataset]:
        if dataset is None:
            return None
        x, y = to_tensors(dataset)
        return TensorDataset(resize_images(x, image_size), y)

    channels, height, width = splits.image_shape
    return DatasetSplits(
        name=splits.name, train=resized(splits.train), test=resized(splits.test), num_classes=splits.num_classes,
        image_shape=(channels, image_size, image_size), classes=splits.classes,
        layout=f"{splits.layout}, resized from {height}x{width} to {image_size}x{image_size} (bilinear)",
    )


def split_description(train: Dataset, test: Optional[Dataset], image_shape: tuple[int, int, int]) -> str:
    """``"1437 train / 360 test, 1x8x8"`` (or ``"..., no test split"``)."""
    counts = f"{len(train)} train / {len(test)} test" if test is not None else f"{len(train)} train, no test split"
    return f"{counts}, {'x'.join(map(str, image_shape))}"


# --- embedded datasets --------------------------------------------------------------------------------------------


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


def subset_count(n: int, count: int) -> int:
    """``count`` checked against a dataset of ``n`` items (a positive integer, at most ``n``)."""
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"the clean count must be a positive integer, got {count!r}")
    if count > n:
        raise ValueError(f"asked for {count} clean examples, but the data hold only {n}")
    return int(count)


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
    labels: torch.Tensor | np.ndarray, fraction: float | None, seed: int = 0, class_balanced: bool = False,
    count: int | None = None,
) -> np.ndarray:
    """Sorted indices of a random subset of ``subset_size(len(labels), fraction)`` items (or exactly ``count``).

    ``class_balanced=True`` takes (nearly) the same number from every class instead of a uniform draw.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    k = subset_count(len(labels), count) if count is not None else subset_size(len(labels), fraction)
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


def clean_subset(data: DataLike, fraction: float | None, seed: int = 0, class_balanced: bool = False,
                 count: int | None = None) -> DataLike:
    """A random ``fraction`` (or ``count`` examples) of a clean dataset (the defender's small clean set).

    Accepts an ``(x, y)`` tensor pair (returns a pair), a ``TensorDataset`` (returns a ``TensorDataset``) or any
    map-style Dataset of ``(x, y)`` samples (returns a ``Subset``). Size: ``fraction * n`` rounded to the
    nearest integer, halves up, at least 1 (5% of 1437 -> 72).
    """
    index = subset_indices(dataset_labels(data), fraction, seed=seed, class_balanced=class_balanced, count=count)
    index_tensor = torch.from_numpy(index)
    if isinstance(data, tuple):
        return data[0][index_tensor], data[1][index_tensor]
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index_tensor] for t in data.tensors))
    return Subset(data, index.tolist())
