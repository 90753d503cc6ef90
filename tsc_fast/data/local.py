"""Datasets read from a local path: CIFAR-10 python batches, GTSRB folders, image class folders, ``.npz`` arrays.

Nothing is ever downloaded: the user points at files they already have. Expected layouts:

- CIFAR-10: ``cifar-10-batches-py/`` holding ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
  ``batches.meta`` (the "python version" archive, unpacked); ``root`` may be that folder or its parent. The
  pickles are read with :class:`RestrictedUnpickler`, which reconstructs numpy arrays and plain builtins only.
- GTSRB: ``Final_Training/Images/000NN/*.ppm`` with one ``GT-000NN.csv`` per class folder, and
  ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (the labelled test annotations) in ``Final_Test/Images``,
  ``Final_Test`` or ``root``; ``root`` may also hold a ``GTSRB/`` folder, or BackdoorBench's ``Train/`` / ``Test/``
  naming. Whole images are resized to ``image_size`` x ``image_size`` (default 32, bilinear), as BackdoorBench does.
- Image folders: ``root/train/<class>/<images>`` with an optional ``root/val/<class>/`` or ``root/test/<class>/``
  as the test split, or class folders directly in ``root`` (``root/<class>/<images>``, no test split). Classes
  are the sorted folder names (torchvision's ImageFolder order). Without ``image_size`` the images keep their own
  size, which must be the same for all of them; with it, the shorter side is resized to ``image_size`` and the
  centre square is kept. Folders whose images are all grayscale (mode "L") give 1-channel images, others RGB.
  Small folders (images up to 64x64, up to 1 GiB as float32) are decoded into memory, larger ones read lazily.
- ``.npz`` files (``numpy.savez``): images ``x`` as (N, H, W, C), (N, C, H, W) or (N, H, W), uint8 0..255 or float
  in [0, 1], integer labels ``y`` (N,); optionally ``x_test``/``y_test``, ``num_classes`` and ``classes`` (names).
  Keras' ``x_train``/``y_train`` naming works too. Read with ``allow_pickle=False``: object arrays are refused.

CIFAR-10, GTSRB and ``.npz`` data are held in memory as ``TensorDataset`` of float32 images in [0, 1]
(``dtype=torch.uint8`` keeps CIFAR-10/GTSRB at raw 0..255 values at a quarter of the memory: about 180 MB for
CIFAR-10 instead of 740 MB); ``image_size=N`` resizes them to N x N (bilinear, antialiased when shrinking).
Image decoding uses Pillow (installed with torchvision).
"""
from __future__ import annotations

import builtins
import csv
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .splits import DatasetSplits, pick_image_size, resize_images, split_description

PathLike = Union[str, Path]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_SIDE = 32

GTSRB_CLASSES = 43
GTSRB_SIDE = 32
GTSRB_TRAIN_FOLDERS = ("Final_Training/Images", "Train/Images")
GTSRB_TEST_FOLDERS = ("Final_Test/Images", "Test/Images")
GTSRB_TEST_CSV = "GT-final_test.csv"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
TRAIN_SPLIT = "train"
TEST_SPLITS = ("val", "test")
EAGER_MAX_SIDE = 64  # image folders with images up to 64x64 ...
EAGER_MAX_VALUES = 2 ** 28  # ... and at most 268M pixel values (1 GiB as float32) are decoded into memory
HEADER_SCAN_ALL = 100_000  # up to this many files every header is read (sizes, modes); beyond, a spread sample
HEADER_SAMPLE = 2_000
SIZES_SHOWN = 3  # differing image sizes named in the error

NPZ_IMAGE_KEYS = ("x", "x_train")
NPZ_LABEL_KEY = {"x": "y", "x_train": "y_train"}
NPZ_TEST_KEYS = ("x_test", "y_test")
NPZ_CHANNEL_SIZES = (1, 3, 4)
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip

EXPECTED_LAYOUTS = (
    f"CIFAR-10 python batches ({CIFAR10_FOLDER}/data_batch_1 ...), GTSRB folders (Final_Training/Images/000NN/ + "
    "Final_Test/Images/), image folders (train/<class>/<images> with an optional val/<class>/ or test/<class>/, "
    "or <class>/<images> directly in the folder), or an .npz file with arrays x and y"
)


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


def _existing_file(root: PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_file():
        raise DatasetLayoutError(f"{what}: no such file {str(path)!r}")
    return path


def _images_to_tensor(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, C, H, W) array -> tensor of ``dtype`` (floats scaled to [0, 1])."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if dtype == torch.uint8:
        return tensor
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a float dtype, got {dtype}")
    return tensor.to(dtype) / 255.0


def _resized_note(native_hw: tuple[int, int], image_size: Optional[int]) -> str:
    """``" (resized from 32x32, bilinear)"``, or nothing when the images kept their size."""
    if image_size is None or tuple(native_hw) == (image_size, image_size):
        return ""
    return f" (resized from {native_hw[0]}x{native_hw[1]}, bilinear)"


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow ships with torchvision
        raise ImportError("reading image files needs Pillow: pip install pillow (or tsc-fast[vision])") from error
    return Image


def _open_image(path: Path):
    """``PIL.Image.open``, with an unreadable file reported as a layout error naming it."""
    Image = _require_pillow()
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetLayoutError(f"{str(path)!r} is not a readable image ({error})") from None


RESIZE_NONE, RESIZE_CROP, RESIZE_STRETCH = "none", "crop", "stretch"


@dataclass(frozen=True)
class ImageFormat:
    """How image files become arrays: channels (1: grayscale, 3: RGB), output height x width, and the resize.

    ``resize``: ``"none"`` (every image must already be height x width), ``"crop"`` (shorter side to the size,
    then the centre crop: ImageNet style) or ``"stretch"`` (the whole image to height x width: GTSRB style).
    """

    channels: int
    height: int
    width: int
    resize: str = RESIZE_NONE

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        colour = "grayscale" if self.channels == 1 else "RGB"
        if self.resize == RESIZE_NONE:
            return f"{self.height}x{self.width} {colour}"
        how = "shorter side, centre crop" if self.resize == RESIZE_CROP else "whole image, bilinear"
        return f"{colour} resized to {self.height}x{self.width} ({how})"

    def read(self, path: Path) -> np.ndarray:
        """The image file as a uint8 (C, H, W) array in this format."""
        with _open_image(path) as image:
            try:
                image = image.convert("L" if self.channels == 1 else "RGB")
            except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data shows up on decoding
                raise DatasetLayoutError(f"{str(path)!r} is not a readable image ({error})") from None
            image = self._resized(image, path)
            array = np.asarray(image, dtype=np.uint8)
        return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()

    def _resized(self, image, path: Path):
        Image = _require_pillow()
        if self.resize == RESIZE_STRETCH:
            return image.resize((self.width, self.height), Image.BILINEAR)
        if self.resize == RESIZE_CROP:
            scale = self.width / min(image.size)
            width = max(self.width, round(image.width * scale))
            height = max(self.height, round(image.height * scale))
            if (width, height) != image.size:
                image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - self.width) // 2, (height - self.height) // 2
            return image.crop((left, top, left + self.width, top + self.height))
        if image.size != (self.width, self.height):
            raise DatasetLayoutError(
                f"{str(path)!r} is {image.height}x{image.width} (height x width), not {self.height}x{self.width} "
                "like the other images: pass --image-size N (image_size=N in Python) to resize them all"
            )
        return image


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


def load_cifar10(root: PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
                 image_size: Optional[int] = None) -> DatasetSplits:
    """CIFAR-10 from its python batches (see the module docstring): 50000 train / 10000 test, 3x32x32.

    ``image_size`` resizes to N x N (bilinear). ``seed`` is accepted for the registry's sake; the split is
    CIFAR-10's own and does not depend on it.
    """
    image_size = pick_image_size(image_size)
    folder = find_cifar10_folder(root)
    parts = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = read_cifar10_batch(folder / CIFAR10_TEST_BATCH)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    train = TensorDataset(resize_images(_images_to_tensor(x_train, dtype), image_size), torch.from_numpy(y_train))
    test = TensorDataset(resize_images(_images_to_tensor(x_test, dtype), image_size), torch.from_numpy(y_test))
    side = image_size or CIFAR10_SIDE
    shape = (3, side, side)
    return DatasetSplits(
        name="cifar10", train=train, test=test, num_classes=10, image_shape=shape,
        classes=read_cifar10_classes(folder),
        layout=(f"CIFAR-10 python batches in {folder}: {split_description(train, test, shape)}"
                f"{_resized_note((CIFAR10_SIDE, CIFAR10_SIDE), image_size)}"),
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


def _load_image_list(entries: Iterable[tuple[Path, int]], image_format: ImageFormat,
                     what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path, label in entries:
        if not path.is_file():
            raise DatasetLayoutError(f"{what}: the annotations name {str(path)!r}, which does not exist")
        images.append(image_format.read(path))
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
    root: PathLike, seed: int = 0, image_size: Optional[int] = None, dtype: torch.dtype = torch.float32, *,
    size: Optional[int] = None,
) -> DatasetSplits:
    """GTSRB from its standard folders (see the module docstring), whole images resized to ``image_size``
    x ``image_size`` (default 32; ``size`` is the older spelling).

    43 classes; ``seed`` is accepted for the registry's sake (the split is GTSRB's own).
    """
    side = pick_image_size(image_size, size) or GTSRB_SIDE  # GTSRB images differ in size: always resized
    path = _existing_folder(root, "GTSRB")
    train_folder = _first_folder(path, GTSRB_TRAIN_FOLDERS)
    test_folder = _first_folder(path, GTSRB_TEST_FOLDERS)
    if train_folder is None or test_folder is None:
        raise DatasetLayoutError(
            f"GTSRB: {str(path)!r} lacks the standard layout: expected Final_Training/Images/000NN/ (with "
            f"GT-000NN.csv) and Final_Test/Images/ (with {GTSRB_TEST_CSV}), directly or under GTSRB/ "
            "(BackdoorBench's Train/Images and Test/Images also work)"
        )
    image_format = ImageFormat(3, side, side, RESIZE_STRETCH)
    x_train, y_train = _load_image_list(gtsrb_train_entries(train_folder), image_format, "GTSRB train")
    x_test, y_test = _load_image_list(gtsrb_test_entries(test_folder, path), image_format, "GTSRB test")
    for labels in (y_train, y_test):
        if labels.min() < 0 or labels.max() >= GTSRB_CLASSES:
            raise DatasetLayoutError(f"GTSRB: class ids must be in 0..{GTSRB_CLASSES - 1}")
    train = TensorDataset(_images_to_tensor(x_train, dtype), torch.from_numpy(y_train))
    test = TensorDataset(_images_to_tensor(x_test, dtype), torch.from_numpy(y_test))
    folders = f"{train_folder.relative_to(path)}/ and {test_folder.relative_to(path)}/"
    return DatasetSplits(
        name="gtsrb", train=train, test=test, num_classes=GTSRB_CLASSES, image_shape=image_format.shape,
        classes=tuple(f"{i:05d}" for i in range(GTSRB_CLASSES)),
        layout=(f"GTSRB folders in {path} ({folders}): {len(train)} train / {len(test)} test, "
                f"{image_format.describe()}"),
    )


# --- image class folders ------------------------------------------------------------------------------------------


def _visible(relative: Path) -> bool:
    """False for anything inside a hidden folder or hidden itself (.DS_Store, .ipynb_checkpoints/...)."""
    return not any(part.startswith(".") for part in relative.parts)


def list_class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders (torchvision's ImageFolder orders classes the same way)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, suffixes: Sequence[str]) -> Iterable[Path]:
    """Image files anywhere under ``folder`` (unsorted, lazily: callers may stop at the first)."""
    for path in folder.rglob("*"):
        if path.suffix.lower() in suffixes and _visible(path.relative_to(folder)) and path.is_file():
            yield path


def list_class_images(
    folder: Path, classes: Optional[Sequence[str]] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """The classes (default: sorted sub-folder names) and every ``(image file, label)`` under ``folder/<class>/``.

    Files are sorted within each class; other files (notes, CSVs) are ignored. A class without a folder, or
    with a folder holding no image, is an error naming it.
    """
    classes = tuple(classes) if classes is not None else tuple(list_class_folders(folder))
    if not classes:
        raise DatasetLayoutError(f"image folders: no class sub-folders in {str(folder)!r}")
    suffixes = tuple(e.lower() for e in extensions)
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        class_folder = folder / name
        if not class_folder.is_dir():
            raise DatasetLayoutError(f"image folders: class {name!r} has no folder {str(class_folder)!r}")
        files = sorted(_images_in(class_folder, suffixes))
        if not files:
            raise DatasetLayoutError(
                f"image folders: the class folder {str(class_folder)!r} holds no image files ({', '.join(suffixes)}): "
                "remove it or add its images"
            )
        samples += [(path, label) for path in files]
    return classes, samples


def holds_class_folders(folder: Path) -> bool:
    """Whether some visible sub-folder of ``folder`` holds an image file (class folders directly in it)."""
    return any(next(_images_in(folder / name, IMAGE_EXTENSIONS), None) is not None
               for name in list_class_folders(folder))


def find_image_split_folders(root: Path) -> tuple[Path, Optional[Path]]:
    """(train folder, test folder or None): ``root/train`` with ``root/val`` or ``root/test`` if there, else
    ``root`` itself when it holds class folders."""
    train = root / TRAIN_SPLIT
    if train.is_dir():
        return train, next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if holds_class_folders(root):
        return root, None
    raise DatasetLayoutError(
        f"image folders: {str(root)!r} needs train/<class>/<images> (with an optional val/<class>/ or "
        "test/<class>/ for the test split) or class folders <class>/<images> directly in it"
    )


def _header_sample(paths: Sequence[Path]) -> Sequence[Path]:
    """All paths, or for a huge folder an evenly spread sample (reading every header would take minutes)."""
    if len(paths) <= HEADER_SCAN_ALL:
        return paths
    return paths[:: math.ceil(len(paths) / HEADER_SAMPLE)]


def scan_image_headers(paths: Sequence[Path]) -> tuple[dict[tuple[int, int], Path], set[str]]:
    """The (height, width) sizes found, each with its first file, and the Pillow modes (headers only)."""
    sizes: dict[tuple[int, int], Path] = {}
    modes: set[str] = set()
    for path in _header_sample(paths):
        with _open_image(path) as image:
            sizes.setdefault((image.height, image.width), path)
            modes.add(image.mode)
    return sizes, modes


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def choose_image_format(paths: Sequence[Path], image_size: Optional[int], root: Path) -> ImageFormat:
    """1 channel if every image is grayscale ("L"), else RGB; the images' own size if they agree, else
    ``image_size`` (required then: the error says so and names a few of the differing files). Beyond
    ``HEADER_SCAN_ALL`` files only a spread sample of headers is read; an odd-sized image missed by it is
    reported when it is read (:meth:`ImageFormat.read`)."""
    sizes, modes = scan_image_headers(paths)
    channels = 1 if modes == {"L"} else 3
    if image_size is not None:
        return ImageFormat(channels, image_size, image_size, RESIZE_CROP)
    if len(sizes) > 1:
        shown = "; ".join(f"{h}x{w}: {_shown(p, root)}" for (h, w), p in list(sizes.items())[:SIZES_SHOWN])
        raise DatasetLayoutError(
            f"image folders: the images in {str(root)!r} differ in size (height x width; {len(sizes)} sizes: "
            f"{shown}{'; ...' if len(sizes) > SIZES_SHOWN else ''}): pass --image-size N (image_size=N in "
            "Python) to resize them all to N x N (shorter side to N, then the centre crop)"
        )
    (height, width), = sizes
    return ImageFormat(channels, height, width, RESIZE_NONE)


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs read lazily from image files: float32 (C, H, W) in [0, 1], one file per item.

    ``samples`` are ``(path, label)`` pairs (see :func:`list_class_images`), ``image_format`` says how files
    become arrays (channels, size, resize).
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], classes: Sequence[str], image_format: ImageFormat):
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.image_format = image_format
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return torch.from_numpy(self.image_format.read(path)).to(torch.float32) / 255.0, label


def decode_image_files(samples: Sequence[tuple[Path, int]], image_format: ImageFormat) -> TensorDataset:
    """Every image decoded into one float32 (N, C, H, W) tensor in [0, 1], with its int64 labels."""
    images = np.empty((len(samples), *image_format.shape), dtype=np.uint8)
    for index, (path, _) in enumerate(samples):
        images[index] = image_format.read(path)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorDataset(_images_to_tensor(images, torch.float32), labels)


def fits_in_memory(n_images: int, image_format: ImageFormat) -> bool:
    """Small images, not too many of them: decoding them all up front beats reading files per batch."""
    values = n_images * image_format.channels * image_format.height * image_format.width
    return max(image_format.height, image_format.width) <= EAGER_MAX_SIDE and values <= EAGER_MAX_VALUES


def _check_same_classes(classes: Sequence[str], test_folder: Path) -> None:
    test_classes = set(list_class_folders(test_folder))
    missing, extra = sorted(set(classes) - test_classes), sorted(test_classes - set(classes))
    if missing or extra:
        raise DatasetLayoutError(
            f"image folders: train/ and {test_folder.name}/ have different classes (only in train: {missing[:5]}, "
            f"only in {test_folder.name}: {extra[:5]})"
        )


def describe_image_folders(root: Path, train_folder: Path, test_folder: Optional[Path], n_classes: int,
                           n_train: int, n_test: int, image_format: ImageFormat, in_memory: bool) -> str:
    """``"image folders in ROOT: train/ (3 classes, 6 images) and val/ (...), 12x12 RGB, in memory"``."""
    if train_folder == root:
        splits = f"one folder per class ({n_classes} classes, {n_train} images), no test split"
    elif test_folder is None:
        splits = f"train/ ({n_classes} classes, {n_train} images), no test split (no val/ or test/ folder)"
    else:
        splits = (f"train/ ({n_classes} classes, {n_train} images) and {test_folder.name}/ "
                  f"({n_classes} classes, {n_test} images)")
    storage = "in memory" if in_memory else "read lazily"
    return f"image folders in {root}: {splits}, {image_format.describe()}, {storage}"


def load_image_folders(
    root: PathLike, seed: int = 0, image_size: Optional[int] = None, name: str = "image_folder",
    lazy: Optional[bool] = None, *, size: Optional[int] = None,
) -> DatasetSplits:
    """Image class folders (see the module docstring): ``root/train/<class>/`` with an optional ``root/val/`` or
    ``root/test/``, or ``root/<class>/`` (then ``test`` is None).

    ``image_size`` (or ``size``): resize to N x N, shorter side then centre crop; without it the images keep
    their own size, which must be the same for all. ``lazy``: None decides by size (:func:`fits_in_memory`),
    True reads files per item (:class:`ImageFolderDataset`), False decodes everything into a TensorDataset.
    The test split must have the training split's classes. ``seed`` is accepted for the registry's sake.
    """
    image_size = pick_image_size(image_size, size)
    path = _existing_folder(root, "image folders")
    train_folder, test_folder = find_image_split_folders(path)
    classes, train_samples = list_class_images(train_folder)
    test_samples: list[tuple[Path, int]] = []
    if test_folder is not None:
        _check_same_classes(classes, test_folder)
        test_samples = list_class_images(test_folder, classes=classes)[1]
    image_format = choose_image_format([p for p, _ in train_samples + test_samples], image_size, path)
    in_memory = fits_in_memory(len(train_samples) + len(test_samples), image_format) if lazy is None else not lazy

    def dataset(samples: list[tuple[Path, int]]) -> Dataset:
        if in_memory:
            return decode_image_files(samples, image_format)
        return ImageFolderDataset(samples, classes, image_format)

    return DatasetSplits(
        name=name, train=dataset(train_samples), test=dataset(test_samples) if test_folder is not None else None,
        num_classes=len(classes), image_shape=image_format.shape, classes=classes,
        layout=describe_image_folders(path, train_folder, test_folder, len(classes), len(train_samples),
                                      len(test_samples), image_format, in_memory),
    )


# --- .npz arrays --------------------------------------------------------------------------------------------------


def open_npz(path: Path):
    """``numpy.load(path, allow_pickle=False)`` of an .npz archive (the file may come from an attacker)."""
    with open(path, "rb") as handle:
        signature = handle.read(4)
    if signature not in ZIP_SIGNATURES:
        raise DatasetLayoutError(f".npz: {str(path)!r} is not an .npz archive (numpy.savez writes one)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetLayoutError(f".npz: {str(path)!r} is not a readable .npz archive ({error})") from None


def read_npz_array(archive, key: str, path: Path) -> np.ndarray:
    """One array of the archive; object arrays (pickled Python objects) are refused, never unpickled."""
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DatasetLayoutError(
                f".npz: array {key!r} in {str(path)!r} holds Python objects (pickled), which tsc_fast never loads "
                "from data files: store plain numeric arrays (uint8 or float images, integer labels)"
            ) from None
        raise DatasetLayoutError(f".npz: array {key!r} in {str(path)!r} is unreadable ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetLayoutError(f".npz: array {key!r} in {str(path)!r} is unreadable ({error})") from None


def _npz_keys_found(keys: Sequence[str]) -> str:
    return ", ".join(keys) if keys else "no arrays"


def npz_train_keys(keys: Sequence[str], path: Path) -> tuple[str, str]:
    """The names of the training images and labels: ``x``/``y`` or Keras' ``x_train``/``y_train``."""
    present = [k for k in NPZ_IMAGE_KEYS if k in keys]
    expected = "arrays x and y (or x_train and y_train), optionally x_test and y_test"
    if not present:
        raise DatasetLayoutError(
            f".npz: {str(path)!r} has no images: expected {expected}; found {_npz_keys_found(keys)}"
        )
    if len(present) > 1:
        raise DatasetLayoutError(f".npz: {str(path)!r} holds both x and x_train: keep one name for the training images")
    images_key = present[0]
    labels_key = NPZ_LABEL_KEY[images_key]
    if labels_key not in keys:
        raise DatasetLayoutError(
            f".npz: {str(path)!r} has {images_key} but no labels {labels_key}: expected {expected}; "
            f"found {_npz_keys_found(keys)}"
        )
    return images_key, labels_key


def npz_image_axes(shape: tuple[int, ...], key: str, path: Path) -> str:
    """``"N,H,W"``, ``"N,C,H,W"`` or ``"N,H,W,C"``: the channel axis is the one of size 1, 3 or 4."""
    if len(shape) == 3:
        return "N,H,W"
    if len(shape) != 4:
        raise DatasetLayoutError(
            f".npz: {key} in {str(path)!r} has shape {shape}: expected images (N, H, W, C), (N, C, H, W) or (N, H, W)"
        )
    first, last = shape[1] in NPZ_CHANNEL_SIZES, shape[3] in NPZ_CHANNEL_SIZES
    if first and last and (shape[1] == 4) != (shape[3] == 4):  # (N, 1, 4, 4), (N, 4, 4, 3): 4 wide, not RGBA
        first, last = shape[1] != 4, shape[3] != 4
    if first != last:
        return "N,C,H,W" if first else "N,H,W,C"
    problem = "could be axis 1 or axis 3" if first else "are neither axis 1 nor axis 3"
    raise DatasetLayoutError(
        f".npz: {key} in {str(path)!r} has shape {shape}: its channels (1, 3 or 4) {problem}; store (N, H, W, C) or "
        "(N, C, H, W) images whose other axes are larger than 4"
    )


def check_npz_pixels(images: np.ndarray, key: str, path: Path) -> None:
    """Integer images must be 0..255, float images finite and in [0, 1] (the error says how to fix them)."""
    where = f".npz: {key} in {str(path)!r}"
    if images.size == 0:
        raise DatasetLayoutError(f"{where} holds no images (shape {images.shape})")
    kind = images.dtype.kind
    if kind in "iu":
        low, high = images.min(), images.max()
        if low < 0 or high > 255:
            raise DatasetLayoutError(f"{where}: integer pixel values must be 0..255, found {low}..{high}")
        return
    if kind != "f":
        raise DatasetLayoutError(f"{where} has dtype {images.dtype}: images must be uint8 (0..255) or float (0..1)")
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if not finite.all():
        raise DatasetLayoutError(f"{where} holds NaN or infinite values (first in image {int(np.argmin(finite))})")
    low, high = float(images.min()), float(images.max())
    if high > 1.0:
        raise DatasetLayoutError(
            f"{where}: float images must be in [0, 1], found values up to {high:g}: divide by 255 "
            "(x / 255.0) or store them as uint8"
        )
    if low < 0.0:
        raise DatasetLayoutError(
            f"{where}: float images must be in [0, 1], found values down to {low:g}: store pixels before any "
            "mean/std normalisation (divide by 255 if they are 0..255)"
        )


def npz_images(images: np.ndarray, key: str, path: Path) -> tuple[torch.Tensor, str]:
    """An .npz image array -> float32 (N, C, H, W) in [0, 1] (uint8 / 255), and how it was laid out."""
    axes = npz_image_axes(images.shape, key, path)
    check_npz_pixels(images, key, path)
    found = f"{axes} {images.dtype}"
    if axes == "N,H,W":
        images = images[:, None]
    elif axes == "N,H,W,C":
        images = images.transpose(0, 3, 1, 2)
    if images.dtype.kind in "iu":
        return _images_to_tensor(images.astype(np.uint8), torch.float32), found
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), found


def npz_labels(labels: np.ndarray, n_images: int, key: str, images_key: str, path: Path) -> torch.Tensor:
    """An .npz label array -> int64 (N,): class indices >= 0, one per image ((N, 1) is flattened)."""
    where = f".npz: {key} in {str(path)!r}"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        raise DatasetLayoutError(f"{where} has shape {labels.shape}, which looks one-hot: store class indices "
                                 "(y.argmax(axis=1)), shape (N,)")
    elif labels.ndim != 1:
        raise DatasetLayoutError(f"{where} has shape {labels.shape}: expected one label per image, shape (N,)")
    if len(labels) != n_images:
        raise DatasetLayoutError(f".npz: {images_key} holds {n_images} images but {key} holds {len(labels)} labels "
                                 f"in {str(path)!r}")
    kind = labels.dtype.kind
    if kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            raise DatasetLayoutError(f"{where}: labels must be integers (class indices), found "
                                     f"{labels[np.argmin(whole)]!r}")
    elif kind not in "iu":
        raise DatasetLayoutError(f"{where} has dtype {labels.dtype}: labels must be integers (class indices)")
    if len(labels) and labels.min() < 0:
        raise DatasetLayoutError(f"{where}: labels must be class indices 0, 1, ..., found {labels.min()}")
    return torch.from_numpy(labels.astype(np.int64))


def npz_num_classes(archive, keys: Sequence[str], labels: Sequence[torch.Tensor], path: Path) -> int:
    """``num_classes`` if the archive holds it (at least max label + 1), else max label + 1."""
    needed = max(int(y.max()) for y in labels if len(y)) + 1
    if "num_classes" not in keys:
        return needed
    value = read_npz_array(archive, "num_classes", path)
    if value.size != 1 or value.dtype.kind not in "iu":
        raise DatasetLayoutError(f".npz: num_classes in {str(path)!r} must be one integer, got {value!r}")
    count = int(value.reshape(-1)[0])
    if count < needed:
        raise DatasetLayoutError(f".npz: num_classes={count} in {str(path)!r}, but the labels go up to {needed - 1}")
    return count


def npz_class_names(archive, keys: Sequence[str], num_classes: int, path: Path) -> tuple[str, ...]:
    """Names from an optional ``classes`` string array, one per class."""
    if "classes" not in keys:
        return ()
    names = read_npz_array(archive, "classes", path)
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) != num_classes:
        raise DatasetLayoutError(f".npz: classes in {str(path)!r} must be {num_classes} strings (one per class), "
                                 f"got {names.dtype} of shape {names.shape}")
    return tuple(str(n.decode("utf-8") if isinstance(n, bytes) else n) for n in names)


def npz_test_split(archive, keys: Sequence[str], train_shape: tuple[int, ...], resizing: bool,
                   path: Path) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(x_test, y_test)`` if both are there (one alone is an error), with the training images' shape."""
    present = [k for k in NPZ_TEST_KEYS if k in keys]
    if not present:
        return None
    if len(present) == 1:
        missing = next(k for k in NPZ_TEST_KEYS if k not in keys)
        raise DatasetLayoutError(f".npz: {str(path)!r} has {present[0]} but no {missing}: give both or neither")
    x_test, _ = npz_images(read_npz_array(archive, "x_test", path), "x_test", path)
    y_test = npz_labels(read_npz_array(archive, "y_test", path), len(x_test), "y_test", "x_test", path)
    same = x_test.shape[1] == train_shape[0] if resizing else tuple(x_test.shape[1:]) == tuple(train_shape)
    if not same:
        raise DatasetLayoutError(f".npz: x_test images are {tuple(x_test.shape[1:])} (C, H, W) but the training "
                                 f"images {tuple(train_shape)} in {str(path)!r}")
    return x_test, y_test


def load_npz(root: PathLike, seed: int = 0, image_size: Optional[int] = None,
             name: Optional[str] = None) -> DatasetSplits:
    """Images and labels from an .npz file (see the module docstring), float32 in [0, 1].

    ``image_size`` resizes to N x N (bilinear, antialiased when shrinking). ``num_classes`` is the archive's
    ``num_classes`` entry or max label + 1. ``name`` defaults to the file name; ``seed`` is accepted for the
    registry's sake (the split is the file's own; without ``x_test``/``y_test`` ``test`` is None).
    """
    image_size = pick_image_size(image_size)
    path = _existing_file(root, ".npz")
    with open_npz(path) as archive:
        keys = list(archive.files)
        images_key, labels_key = npz_train_keys(keys, path)
        x_train, found = npz_images(read_npz_array(archive, images_key, path), images_key, path)
        y_train = npz_labels(read_npz_array(archive, labels_key, path), len(x_train), labels_key, images_key, path)
        test = npz_test_split(archive, keys, tuple(x_train.shape[1:]), image_size is not None, path)
        num_classes = npz_num_classes(archive, keys, [y_train] + ([test[1]] if test else []), path)
        classes = npz_class_names(archive, keys, num_classes, path)
    native = tuple(x_train.shape[2:])
    train_set = TensorDataset(resize_images(x_train, image_size), y_train)
    test_set = TensorDataset(resize_images(test[0], image_size), test[1]) if test else None
    shape = tuple(train_set.tensors[0].shape[1:])
    arrays = f"{images_key} ({found}) and {labels_key}" + (", x_test and y_test" if test else "")
    return DatasetSplits(
        name=name or path.name, train=train_set, test=test_set, num_classes=num_classes, image_shape=shape,
        classes=classes,
        layout=(f".npz arrays {arrays} in {path}: {split_description(train_set, test_set, shape)}, "
                f"{num_classes} classes{_resized_note(native, image_size)}"),
    )


# --- layout detection ---------------------------------------------------------------------------------------------


def detect_layout(root: PathLike) -> str:
    """Which local dataset a path holds: ``"cifar10"``, ``"gtsrb"``, ``"image_folder"`` or ``"npz"``."""
    path = Path(root).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise DatasetLayoutError(f"{str(path)!r} is a file but not an .npz; tsc_fast reads {EXPECTED_LAYOUTS}")
    path = _existing_folder(path, "dataset")
    if any((c / "data_batch_1").is_file() for c in (path, path / CIFAR10_FOLDER)):
        return "cifar10"
    if _first_folder(path, GTSRB_TRAIN_FOLDERS) is not None:
        return "gtsrb"
    if (path / TRAIN_SPLIT).is_dir() or holds_class_folders(path):
        return "image_folder"
    raise DatasetLayoutError(f"{str(path)!r} holds no dataset layout tsc_fast knows: expected {EXPECTED_LAYOUTS}")


LOCAL_LOADERS = {"cifar10": load_cifar10, "gtsrb": load_gtsrb, "image_folder": load_image_folders, "npz": load_npz}


def load_local(root: PathLike, seed: int = 0, **options) -> DatasetSplits:
    """Load whichever known dataset layout ``root`` holds (``detect_layout``); ``options`` go to its loader."""
    return LOCAL_LOADERS[detect_layout(root)](root, seed=seed, **options)
