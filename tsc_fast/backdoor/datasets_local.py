"""Datasets read from a local path: CIFAR-10 python batches, GTSRB folders, ImageNet-style class folders.

Nothing is ever downloaded: the user points at a folder they already have. Expected layouts:

- CIFAR-10: ``cifar-10-batches-py/`` holding ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
  ``batches.meta`` (the "python version" archive, unpacked); ``root`` may be that folder or its parent. The
  pickles are read with :class:`RestrictedUnpickler`, which reconstructs numpy arrays and plain builtins only.
- GTSRB: ``Final_Training/Images/000NN/*.ppm`` with one ``GT-000NN.csv`` per class folder, and
  ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (the labelled test annotations) in ``Final_Test/Images``,
  ``Final_Test`` or ``root``; ``root`` may also hold a ``GTSRB/`` folder, or BackdoorBench's ``Train/`` / ``Test/``
  naming. Whole images are resized to ``size`` x ``size`` (default 32, bilinear), as BackdoorBench does.
- ImageNet-style folders (ImageNet-100 and the like): ``root/train/<class>/*.jpg`` and ``root/val/<class>/*``
  (``test`` is accepted instead of ``val``). Loaded lazily, one image per ``__getitem__``: the shorter side is
  resized to ``size`` (default 224) and the centre ``size`` x ``size`` crop is kept.

CIFAR-10 and GTSRB are held in memory as ``TensorDataset`` of float32 images in [0, 1] (``dtype=torch.uint8``
keeps raw 0..255 values at a quarter of the memory: about 180 MB for CIFAR-10 instead of 740 MB).
Image decoding uses Pillow (installed with torchvision).
"""
from __future__ import annotations

import builtins
import csv
import pickle
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .data import DatasetSplits

PathLike = Union[str, Path]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_SIDE = 32

GTSRB_CLASSES = 43
GTSRB_TRAIN_FOLDERS = ("Final_Training/Images", "Train/Images")
GTSRB_TEST_FOLDERS = ("Final_Test/Images", "Test/Images")
GTSRB_TEST_CSV = "GT-final_test.csv"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
TRAIN_SPLIT = "train"
TEST_SPLITS = ("val", "test")


class DatasetLayoutError(ValueError):
    """A local dataset path is missing or its files are not laid out as expected (the message says what was)."""


# --- restricted unpickling ----------------------------------------------------------------------------------------


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The callables numpy's own pickles name, under both the numpy 1 and numpy 2 module paths."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles call (``_codecs.encode``) to rebuild bytes; only the latin1 codec is allowed."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays/scalars/dtypes, inert builtin containers and bytes.

    Any other global (``os.system``, ``builtins.eval``, a class of some package, ...) raises
    ``pickle.UnpicklingError`` instead of being imported, so a malicious file cannot run code.
    """

    SAFE_BUILTINS = ("set", "frozenset", "bytearray", "complex", "slice", "range")

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _numpy_reconstructors()
        for name in self.SAFE_BUILTINS:
            self._allowed[("builtins", name)] = getattr(builtins, name)
        self._allowed[("_codecs", "encode")] = _latin1_bytes

    def find_class(self, module: str, name: str) -> Any:
        key = ("builtins" if module == "__builtin__" else module, name)  # Python 2 pickles say __builtin__
        if key in self._allowed:
            return self._allowed[key]
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only numpy arrays and plain builtin values are allowed "
            "in dataset files"
        )


def safe_unpickle(path: PathLike) -> Any:
    """Load a pickle file with :class:`RestrictedUnpickler` (latin1 strings, as CIFAR's Python 2 pickles need)."""
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle, encoding="latin1").load()


def _text_keys(mapping: Any) -> Any:
    """A dict with bytes keys (pickles written by Python 3 from byte strings) gets str keys; other values pass."""
    if not isinstance(mapping, dict):
        return mapping
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in mapping.items()}


# --- helpers ------------------------------------------------------------------------------------------------------


def _existing_folder(root: PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetLayoutError(f"{what}: no such folder {str(path)!r}")
    if not path.is_dir():
        raise DatasetLayoutError(f"{what}: {str(path)!r} is not a folder")
    return path


def _images_to_tensor(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, C, H, W) array -> tensor of ``dtype`` (floats scaled to [0, 1])."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if dtype == torch.uint8:
        return tensor
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a float dtype, got {dtype}")
    return tensor.to(dtype) / 255.0


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow ships with torchvision
        raise ImportError("reading image files needs Pillow: pip install pillow (or tsc-fast[vision])") from error
    return Image


def _read_image(path: Path, size: int, crop: bool) -> np.ndarray:
    """An image file as a uint8 (3, size, size) array: resized to size x size, or shorter side + centre crop."""
    Image = _require_pillow()
    with Image.open(path) as image:
        image = image.convert("RGB")
        if crop:
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.BILINEAR)
        return np.array(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    return int(size)


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


def find_cifar10_folder(root: PathLike) -> Path:
    """The ``cifar-10-batches-py`` folder: ``root`` itself or ``root/cifar-10-batches-py``."""
    path = _existing_folder(root, "CIFAR-10")
    for candidate in (path, path / CIFAR10_FOLDER):
        if all((candidate / name).is_file() for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)):
            return candidate
    expected = ", ".join((*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH, CIFAR10_META))
    raise DatasetLayoutError(
        f"CIFAR-10: {str(path)!r} is not a CIFAR-10 python folder: expected the files {expected} in it or in "
        f"{str(path / CIFAR10_FOLDER)!r} (the unpacked cifar-10-python.tar.gz; tsc_fast downloads nothing)"
    )


def read_cifar10_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,), validated."""
    batch = _text_keys(safe_unpickle(path))
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DatasetLayoutError(f"CIFAR-10: {str(path)!r} is not a CIFAR-10 batch (a dict with 'data' and 'labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    pixels = 3 * CIFAR10_SIDE * CIFAR10_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels or len(data) != len(labels):
        raise DatasetLayoutError(
            f"CIFAR-10: {str(path)!r} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; "
            f"expected uint8 (N, {pixels}) and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetLayoutError(f"CIFAR-10: {str(path)!r} has labels outside 0..9")
    # each row: 1024 red, 1024 green, 1024 blue values, each plane row-major
    return data.reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE), labels


def read_cifar10_classes(folder: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (empty if the file is absent)."""
    meta_path = folder / CIFAR10_META
    if not meta_path.is_file():
        return ()
    meta = _text_keys(safe_unpickle(meta_path))
    names = meta.get("label_names", []) if isinstance(meta, dict) else []
    return tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names)


def load_cifar10(root: PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> DatasetSplits:
    """CIFAR-10 from its python batches (see the module docstring): 50000 train / 10000 test, 3x32x32.

    ``seed`` is accepted for the registry's sake; the split is CIFAR-10's own and does not depend on it.
    """
    folder = find_cifar10_folder(root)
    parts = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = read_cifar10_batch(folder / CIFAR10_TEST_BATCH)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return DatasetSplits(
        name="cifar10",
        train=TensorDataset(_images_to_tensor(x_train, dtype), torch.from_numpy(y_train)),
        test=TensorDataset(_images_to_tensor(x_test, dtype), torch.from_numpy(y_test)),
        num_classes=10,
        image_shape=(3, CIFAR10_SIDE, CIFAR10_SIDE),
        classes=read_cifar10_classes(folder),
    )


# --- GTSRB --------------------------------------------------------------------------------------------------------


def _first_folder(root: Path, relative: Sequence[str]) -> Path | None:
    for base in (root, root / "GTSRB"):
        for rel in relative:
            if (base / rel).is_dir():
                return base / rel
    return None


def _read_gt_csv(path: Path) -> list[tuple[str, int]]:
    """(file name, class id) rows of a GTSRB ground-truth CSV (``;``-separated, header with Filename, ClassId)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise DatasetLayoutError(f"GTSRB: {str(path)!r} has no 'Filename;...;ClassId' header")
    name_at, class_at = rows[0].index("Filename"), rows[0].index("ClassId")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            entries.append((row[name_at], int(row[class_at])))
        except (IndexError, ValueError):
            raise DatasetLayoutError(f"GTSRB: {str(path)!r} line {line} is malformed: {';'.join(row)!r}") from None
    return entries


def _load_image_list(entries: Iterable[tuple[Path, int]], size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path, label in entries:
        if not path.is_file():
            raise DatasetLayoutError(f"{what}: the annotations name {str(path)!r}, which does not exist")
        images.append(_read_image(path, size, crop=False))
        labels.append(label)
    if not images:
        raise DatasetLayoutError(f"{what}: no images listed")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def gtsrb_train_entries(train_folder: Path) -> list[tuple[Path, int]]:
    """(image path, label) of every training image, from each class folder's ``GT-000NN.csv``."""
    class_folders = sorted(p for p in train_folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not class_folders:
        raise DatasetLayoutError(f"GTSRB: no class folders 00000 .. 00042 in {str(train_folder)!r}")
    entries = []
    for folder in class_folders:
        csv_path = folder / f"GT-{folder.name}.csv"
        if not csv_path.is_file():
            raise DatasetLayoutError(f"GTSRB: missing {str(csv_path)!r} (each class folder needs its GT-000NN.csv)")
        entries += [(folder / name, label) for name, label in _read_gt_csv(csv_path)]
    return entries


def gtsrb_test_entries(test_folder: Path, root: Path) -> list[tuple[Path, int]]:
    """(image path, label) of every test image, from ``GT-final_test.csv`` (searched next to the images)."""
    candidates = [test_folder / GTSRB_TEST_CSV, test_folder.parent / GTSRB_TEST_CSV, root / GTSRB_TEST_CSV,
                  root / "GTSRB" / GTSRB_TEST_CSV]
    csv_path = next((c for c in candidates if c.is_file()), None)
    if csv_path is None:
        searched = ", ".join(repr(str(c)) for c in candidates)
        raise DatasetLayoutError(f"GTSRB: the labelled test annotations {GTSRB_TEST_CSV} were not found ({searched})")
    return [(test_folder / name, label) for name, label in _read_gt_csv(csv_path)]


def load_gtsrb(
    root: PathLike, seed: int = 0, size: int = 32, dtype: torch.dtype = torch.float32
) -> DatasetSplits:
    """GTSRB from its standard folders (see the module docstring), images resized to ``size`` x ``size``.

    43 classes; ``seed`` is accepted for the registry's sake (the split is GTSRB's own).
    """
    size = _check_size(size)
    path = _existing_folder(root, "GTSRB")
    train_folder = _first_folder(path, GTSRB_TRAIN_FOLDERS)
    test_folder = _first_folder(path, GTSRB_TEST_FOLDERS)
    if train_folder is None or test_folder is None:
        raise DatasetLayoutError(
            f"GTSRB: {str(path)!r} lacks the standard layout: expected Final_Training/Images/000NN/ (with "
            f"GT-000NN.csv) and Final_Test/Images/ (with {GTSRB_TEST_CSV}), directly or under GTSRB/ "
            "(BackdoorBench's Train/Images and Test/Images also work)"
        )
    x_train, y_train = _load_image_list(gtsrb_train_entries(train_folder), size, "GTSRB train")
    x_test, y_test = _load_image_list(gtsrb_test_entries(test_folder, path), size, "GTSRB test")
    for labels in (y_train, y_test):
        if labels.min() < 0 or labels.max() >= GTSRB_CLASSES:
            raise DatasetLayoutError(f"GTSRB: class ids must be in 0..{GTSRB_CLASSES - 1}")
    return DatasetSplits(
        name="gtsrb",
        train=TensorDataset(_images_to_tensor(x_train, dtype), torch.from_numpy(y_train)),
        test=TensorDataset(_images_to_tensor(x_test, dtype), torch.from_numpy(y_test)),
        num_classes=GTSRB_CLASSES,
        image_shape=(3, size, size),
        classes=tuple(f"{i:05d}" for i in range(GTSRB_CLASSES)),
    )


# --- ImageNet-style class folders ---------------------------------------------------------------------------------


def list_class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataset(Dataset):
    """Images in ``folder/<class>/<file>``, read lazily: ``(float32 (3, size, size) in [0, 1], label)``.

    ``classes`` fixes the class order (default: the sorted sub-folder names); files whose extension is not an
    image extension are ignored. Each image is resized (shorter side to ``size``) and centre-cropped.
    """

    def __init__(self, folder: PathLike, classes: Sequence[str] | None = None, size: int = 224,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.folder = _existing_folder(folder, "image folder")
        self.size = _check_size(size)
        self.classes = tuple(classes) if classes is not None else tuple(list_class_folders(self.folder))
        if not self.classes:
            raise DatasetLayoutError(f"image folder: no class sub-folders in {str(self.folder)!r}")
        suffixes = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_folder = self.folder / name
            if not class_folder.is_dir():
                raise DatasetLayoutError(f"image folder: class {name!r} has no folder {str(class_folder)!r}")
            files = sorted(p for p in class_folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise DatasetLayoutError(f"image folder: no image files ({', '.join(suffixes)}) under {str(self.folder)!r}")
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _read_image(path, self.size, crop=True)
        return torch.from_numpy(image).float() / 255.0, label


def load_image_folders(
    root: PathLike, seed: int = 0, size: int = 224, name: str = "image_folder"
) -> DatasetSplits:
    """ImageNet-style ``root/train/<class>/...`` and ``root/val/<class>/...`` (or ``test``) as lazy datasets.

    Both splits use the training split's class list (sorted folder names); a class missing from the validation
    split is an error. ``seed`` is accepted for the registry's sake (the split is the folders' own).
    """
    path = _existing_folder(root, "image folders")
    train_folder = path / TRAIN_SPLIT
    test_folder = next((path / s for s in TEST_SPLITS if (path / s).is_dir()), None)
    if not train_folder.is_dir() or test_folder is None:
        raise DatasetLayoutError(
            f"image folders: {str(path)!r} needs train/<class>/<images> and val/<class>/<images> (or test/) "
            "sub-folders, ImageNet style"
        )
    train = ImageFolderDataset(train_folder, size=size)
    missing = sorted(set(train.classes) - set(list_class_folders(test_folder)))
    extra = sorted(set(list_class_folders(test_folder)) - set(train.classes))
    if missing or extra:
        raise DatasetLayoutError(
            f"image folders: train/ and {test_folder.name}/ have different classes (only in train: {missing[:5]}, "
            f"only in {test_folder.name}: {extra[:5]})"
        )
    test = ImageFolderDataset(test_folder, classes=train.classes, size=size)
    return DatasetSplits(name=name, train=train, test=test, num_classes=len(train.classes),
                         image_shape=(3, train.size, train.size), classes=train.classes)


# --- layout detection ---------------------------------------------------------------------------------------------


def detect_layout(root: PathLike) -> str:
    """Which local dataset a folder holds: ``"cifar10"``, ``"gtsrb"`` or ``"image_folder"``."""
    path = _existing_folder(root, "dataset")
    if any((c / "data_batch_1").is_file() for c in (path, path / CIFAR10_FOLDER)):
        return "cifar10"
    if _first_folder(path, GTSRB_TRAIN_FOLDERS) is not None:
        return "gtsrb"
    if (path / TRAIN_SPLIT).is_dir() and any((path / s).is_dir() for s in TEST_SPLITS):
        return "image_folder"
    raise DatasetLayoutError(
        f"{str(path)!r} holds no dataset layout tsc_fast knows: expected CIFAR-10 python batches "
        f"({CIFAR10_FOLDER}/data_batch_1 ...), GTSRB folders (Final_Training/Images/000NN/ + Final_Test/Images/), "
        "or ImageNet-style train/<class>/ and val/<class>/ folders"
    )


LOCAL_LOADERS = {"cifar10": load_cifar10, "gtsrb": load_gtsrb, "image_folder": load_image_folders}


def load_local(root: PathLike, seed: int = 0, **options) -> DatasetSplits:
    """Load whichever known dataset layout ``root`` holds (``detect_layout``); ``options`` go to its loader."""
    return LOCAL_LOADERS[detect_layout(root)](root, seed=seed, **options)
