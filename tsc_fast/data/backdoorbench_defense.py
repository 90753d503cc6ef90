"""Defending a BackdoorBench attack record: its clean data, the defender's clean subset, BackdoorBench's metrics,
and a ``defense_result.pt`` BackdoorBench's own tools read.

What BackdoorBench does (github.com/SCLBD/BackdoorBench, 2.x), and what this module does the same way:

- Clean data (``utils/save_load_attack.py``, ``load_attack_result``): the record's ``data_path`` (``./data/cifar10``
  for ``--dataset_path ./data --dataset cifar10``) is taken from its first ``data`` on and joined to the folder
  above ``record`` in the record's absolute path, i.e. BackdoorBench's repository root; the dataset is read there
  by ``dataset_and_transform_generate`` (torchvision's CIFAR10/CIFAR100 python batches, its own GTSRB reader of
  ``Train/000NN/GT-000NN.csv`` and ``Test/GT-final_test.csv`` resized to ``img_size``). :func:`find_clean_data`
  tries that first; with ``data_root`` (``tsc-fast purify --data-dir``) it looks in that folder instead. Supported
  datasets: :data:`SUPPORTED_DATASETS` (``mnist``, ``tiny`` and ``imagenet`` records are refused with an error).
- The defender's clean subset (``utils/choose_index.py``, ``choose_index``, called right after
  ``fix_random(random_seed)`` by ``defense/ft.py``, ``anp.py``, ... and by TSC's ``defense/repair_mc.py``):
  ``random.seed(seed); random.sample(range(n), int(n * ratio))`` over the clean training set, ``ratio`` 0.05 and
  ``random_seed`` 0 by default; or the indices of an ``--index`` text file (``np.loadtxt``). Python's ``random`` is
  the same generator on every CPython 3, so :func:`backdoorbench_subset_indices` gives the very same images
  (2500 of CIFAR-10's 50000 for the defaults), in the same order.
- Metrics (``analysis/visual_metric.py``, ``utils/trainer_cls.py``): ACC over the clean test set; ASR the fraction
  of ``bd_test`` classified as its backdoor label; RA the fraction classified as its original label. ``bd_test``
  holds only the test images whose label the attack changes (all-to-one: the non-target ones,
  ``generate_poison_index_from_label_transform(train=False)``); :func:`evaluate_backdoorbench` also drops any
  sample whose backdoor label equals its original one, so a record built otherwise measures the same thing.
- Defense results (``save_defense_result``, written by each defense to ``record/<attack>/defense/<defense>/``):
  ``{"model_name", "num_classes", "model": state_dict}``; ``visual_metric.py`` loads the state_dict strictly into
  ``generate_cls_model(model_name, num_classes)``. :func:`save_defense_result` writes that form with the bare
  network's keys (no normalisation wrapper, no ``module.``), plain tensors only, atomically.
"""
from __future__ import annotations

import collections
import contextlib
import os
import pickle
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..metrics import accuracy, predict
from ..normalization import NormalizedModel
from .backdoorbench import BackdoorBenchResult, PoisonedSplit, build_backdoorbench_network
from .local import (
    DatasetLayoutError,
    detect_layout,
    find_cifar10_folder,
    gtsrb_test_entries,
    gtsrb_train_entries,
    load_cifar10,
    load_gtsrb,
    safe_unpickle,
)
from .splits import DatasetSplits

PathLike = Union[str, Path]
TensorPair = tuple[torch.Tensor, torch.Tensor]

SUPPORTED_DATASETS = ("cifar10", "cifar100", "gtsrb")
DEFAULT_RATIO = 0.05  # BackdoorBench's config/defense/*/config.yaml "ratio"
DEFAULT_SEED = 0  # ... and "random_seed"
DEFENSE_RESULT_FILE = "defense_result.pt"
DEFENSE_NAME = "tsc_fast"
CIFAR100_FOLDER = "cifar-100-python"


class CleanDataNotFoundError(FileNotFoundError):
    """The record's clean dataset is not where it was looked for (the message names every path and the fix)."""


class UnsupportedDatasetError(ValueError):
    """A record made on a dataset whose files tsc_fast cannot read."""


# --- finding the clean data ---------------------------------------------------------------------------------------


def _backdoorbench_root(record_dir: Optional[Path]) -> Optional[Path]:
    """The folder above the last ``record`` component of the record's path (BackdoorBench's repository root)."""
    if record_dir is None:
        return None
    parts = Path(record_dir).resolve().parts
    positions = [i for i, part in enumerate(parts) if part == "record"]
    return Path(*parts[: positions[-1]]) if positions and positions[-1] > 0 else None


def _data_tail(data_path: str) -> Optional[Path]:
    """``data_path`` from its first ``data`` on (what load_attack_result keeps): ``./data/cifar10`` -> data/cifar10."""
    start = data_path.find("data")
    return Path(data_path[start:]) if start >= 0 else None


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))  # first occurrence wins


def data_path_candidates(result: BackdoorBenchResult, data_root: Optional[PathLike] = None) -> list[Path]:
    """The folders :func:`find_clean_data` tries, in order.

    With ``data_root``: ``data_root/<dataset folder>`` (``data_root`` as BackdoorBench's ``data`` folder),
    ``data_root/data/<dataset folder>`` (as its repository root), ``data_root/<dataset name>``, ``data_root`` itself
    (the dataset's own folder). Without: BackdoorBench's own rule (repository root above ``record`` + ``data_path``
    from ``data`` on), then ``data_path`` as recorded (absolute, or relative to the current directory).
    """
    data_path = result.data_path or ""
    tail = _data_tail(data_path)
    inner = Path(*tail.parts[1:]) if tail is not None and len(tail.parts) > 1 else None
    if data_root is not None:
        root = Path(data_root).expanduser()
        candidates = [root / inner] if inner is not None else []
        candidates += [root / tail] if tail is not None else []
        return _unique(candidates + [root / result.dataset, root])
    candidates = []
    bb_root = _backdoorbench_root(result.record_dir)
    if bb_root is not None and tail is not None:
        candidates.append(bb_root / tail)
    if data_path:
        recorded = Path(data_path).expanduser()
        candidates.append(recorded if recorded.is_absolute() else Path.cwd() / recorded)
    return _unique(candidates)


def _cifar100_folder(root: Path) -> Optional[Path]:
    for candidate in (root, root / CIFAR100_FOLDER):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    return None


def _is_backdoorbench_gtsrb(root: Path) -> bool:
    """BackdoorBench's own GTSRB layout (sh/gtsrb_download.sh): ``Train/000NN/`` and ``Test/GT-final_test.csv``."""
    return (root / "Train" / "00000").is_dir() and (root / "Test" / "GT-final_test.csv").is_file()


def _holds_dataset(folder: Path, dataset: str) -> bool:
    if not folder.is_dir():
        return False
    try:
        if dataset == "cifar10":
            find_cifar10_folder(folder)
            return True
        if dataset == "cifar100":
            return _cifar100_folder(folder) is not None
        return _is_backdoorbench_gtsrb(folder) or detect_layout(folder) == "gtsrb"
    except DatasetLayoutError:
        return False


def _require_supported(result: BackdoorBenchResult) -> None:
    if result.dataset not in SUPPORTED_DATASETS:
        raise UnsupportedDatasetError(
            f"the record was made on {result.dataset!r}; tsc_fast reads the clean data of "
            f"{', '.join(SUPPORTED_DATASETS)} records only"
        )


def find_clean_data(result: BackdoorBenchResult, data_root: Optional[PathLike] = None) -> Path:
    """The folder holding the record's clean dataset (see :func:`data_path_candidates` for where it looks).

    Raises :class:`UnsupportedDatasetError` for a dataset outside :data:`SUPPORTED_DATASETS` and
    :class:`CleanDataNotFoundError` (naming every path tried and the ``--data-dir`` fix) when none holds it.
    """
    _require_supported(result)
    candidates = data_path_candidates(result, data_root)
    for folder in candidates:
        if _holds_dataset(folder, result.dataset):
            return folder
    tried = ", ".join(repr(str(c)) for c in candidates) or "nothing (the record has no data_path)"
    where = f"in --data-dir {str(data_root)!r}" if data_root is not None else "where the record says"
    raise CleanDataNotFoundError(
        f"the record's clean {result.dataset} data (data_path {result.data_path!r}) is not {where}: tried {tried}. "
        f"Pass the folder that holds it with --data-dir DATA_ROOT (BackdoorBench's data folder, or the "
        f"{result.dataset} folder itself); nothing is downloaded"
    )


# --- loading it ---------------------------------------------------------------------------------------------------


def _read_cifar100_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()} \
        if isinstance(batch, dict) else batch
    if not isinstance(batch, dict) or "data" not in batch or "fine_labels" not in batch:
        raise DatasetLayoutError(f"CIFAR-100: {str(path)!r} is not a CIFAR-100 split (a dict with 'data' and "
                                 "'fine_labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["fine_labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetLayoutError(f"CIFAR-100: {str(path)!r} holds data of shape {data.shape} ({data.dtype}) and "
                                 f"{len(labels)} labels; expected uint8 (N, 3072) and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise DatasetLayoutError(f"CIFAR-100: {str(path)!r} has labels outside 0..99")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar100(root: PathLike) -> DatasetSplits:
    """CIFAR-100 from its python files (``cifar-100-python/train`` and ``test``, fine labels), uint8 images."""
    folder = _cifar100_folder(Path(root))
    if folder is None:
        raise DatasetLayoutError(f"CIFAR-100: no train/test files in {str(root)!r} or its {CIFAR100_FOLDER}/")
    (x_train, y_train), (x_test, y_test) = (_read_cifar100_split(folder / name) for name in ("train", "test"))
    return DatasetSplits(name="cifar100", num_classes=100, image_shape=(3, 32, 32),
                         train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                         test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)))


def _read_stretched(entries: list[tuple[Path, int]], side: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Image files -> uint8 (N, 3, side, side) and labels: the whole image resized with PIL's bilinear filter,
    which is what BackdoorBench's transforms.Resize((side, side)) does to its PIL images."""
    from PIL import Image

    images = []
    for path, _ in entries:
        if not path.is_file():
            raise DatasetLayoutError(f"{what}: the annotations name {str(path)!r}, which does not exist")
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((side, side), Image.BILINEAR)
            images.append(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    if not images:
        raise DatasetLayoutError(f"{what}: no images listed")
    labels = np.asarray([label for _, label in entries], dtype=np.int64)
    if labels.min() < 0 or labels.max() > 42:
        raise DatasetLayoutError(f"{what}: class ids must be in 0..42")
    return np.stack(images), labels


def _load_backdoorbench_gtsrb(root: Path, size: int) -> DatasetSplits:
    """GTSRB in BackdoorBench's layout, read in its order (classes 0..42, CSV rows), resized to size x size."""
    x_train, y_train = _read_stretched(gtsrb_train_entries(root / "Train"), size, "GTSRB train")
    x_test, y_test = _read_stretched(gtsrb_test_entries(root / "Test", root), size, "GTSRB test")
    return DatasetSplits(name="gtsrb", num_classes=43, image_shape=(3, size, size),
                         train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                         test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)))


def load_record_dataset(result: BackdoorBenchResult, data_root: Optional[PathLike] = None
                        ) -> tuple[DatasetSplits, Path]:
    """The record's clean train/test splits as uint8 ``TensorDataset``s (0..255), and the folder they came from.

    Raises ValueError when the data contradict the record (image shape, number of classes).
    """
    folder = find_clean_data(result, data_root)
    channels, height, width = result.image_shape
    if result.dataset == "cifar10":
        splits = load_cifar10(folder, dtype=torch.uint8)
    elif result.dataset == "cifar100":
        splits = load_cifar100(folder)
    elif _is_backdoorbench_gtsrb(folder):
        splits = _load_backdoorbench_gtsrb(folder, height)
    else:
        splits = load_gtsrb(folder, size=height, dtype=torch.uint8)
    if tuple(splits.image_shape) != tuple(result.image_shape) or splits.num_classes != result.num_classes:
        raise ValueError(
            f"the {result.dataset} data in {str(folder)!r} are {splits.image_shape} images of {splits.num_classes} "
            f"classes, the record says {result.image_shape} and {result.num_classes}"
        )
    return splits, folder


# --- the defender's clean subset ----------------------------------------------------------------------------------


def backdoorbench_subset_indices(n: int, ratio: float = DEFAULT_RATIO, seed: int = DEFAULT_SEED) -> np.ndarray:
    """BackdoorBench's ``choose_index`` after ``fix_random(seed)``: ``random.sample(range(n), int(n * ratio))``.

    The same positions in the same order as BackdoorBench's defenses (and TSC's official code) draw. Raises
    ValueError for a ratio outside (0, 1] or one that leaves no sample.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    k = int(n * ratio)  # truncated, as choose_index does
    if k < 1:
        raise ValueError(f"ratio {ratio} of {n} samples leaves none")
    return np.asarray(random.Random(int(seed)).sample(range(n), k), dtype=np.int64)


def read_index_file(path: PathLike, n: int) -> np.ndarray:
    """Clean-subset positions from a text file (BackdoorBench's ``--index``, e.g. a defense's ``log/index.txt``)."""
    try:
        index = np.atleast_1d(np.loadtxt(Path(path).expanduser(), dtype=np.int64))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read clean-subset indices from {str(path)!r}: {error}") from None
    if index.ndim != 1 or not len(index):
        raise ValueError(f"{str(path)!r} must list one integer index per line")
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"{str(path)!r} holds indices outside 0..{n - 1}")
    return index


def _float_images(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if not x.dtype.is_floating_point else x


@dataclass
class DefenderData:
    """What a defender of a BackdoorBench record works with, images float32 in [0, 1].

    ``clean_train``: the clean subset (BackdoorBench's choice, see :func:`backdoorbench_subset_indices`);
    ``subset_index`` its positions in the clean training split; ``clean_test`` the whole clean test split (ACC);
    ``bd_test`` the record's poisoned test images (ASR, RA), None when it has none; ``data_folder`` where the
    clean data were read; ``train_size`` the clean training split's size.
    """

    clean_train: TensorPair
    subset_index: np.ndarray
    clean_test: TensorPair
    bd_test: Optional[PoisonedSplit]
    data_folder: Path
    train_size: int
    notes: list[str] = field(default_factory=list)


def _check_indicator(split: Optional[PoisonedSplit], size: int, what: str, folder: Path) -> None:
    """A poisoned split's poison_indicator has one entry per clean sample: a different count means other data."""
    if split is not None and split.poison_indicator is not None and len(split.poison_indicator) != size:
        raise ValueError(f"the record's {what} poison_indicator covers {len(split.poison_indicator)} samples but "
                         f"the data in {str(folder)!r} have {size}: not the dataset the attack used")


def load_defender_data(
    result: BackdoorBenchResult,
    data_root: Optional[PathLike] = None,
    ratio: float = DEFAULT_RATIO,
    seed: int = DEFAULT_SEED,
    index_file: Optional[PathLike] = None,
) -> DefenderData:
    """The record's clean subset (``ratio``/``seed`` as BackdoorBench draws it, or ``index_file``), its clean test
    set and its poisoned test set. See :func:`find_clean_data` for where the data are looked for and its errors."""
    splits, folder = load_record_dataset(result, data_root)
    x_train, y_train = splits.train.tensors
    x_test, y_test = splits.test.tensors
    _check_indicator(result.bd_train, len(y_train), "bd_train", folder)
    _check_indicator(result.bd_test, len(y_test), "bd_test", folder)
    if index_file is not None:
        index = read_index_file(index_file, len(y_train))
    else:
        index = backdoorbench_subset_indices(len(y_train), ratio, seed)
    picked = torch.from_numpy(index)
    notes = [] if result.bd_test is not None else ["the record has no readable bd_test: no ASR or RA"]
    return DefenderData(
        clean_train=(_float_images(x_train[picked]), y_train[picked].clone()), subset_index=index,
        clean_test=(_float_images(x_test), y_test), bd_test=result.bd_test, data_folder=folder,
        train_size=len(y_train), notes=notes,
    )


# --- metrics ------------------------------------------------------------------------------------------------------


def attack_test_split(bd_test: PoisonedSplit) -> PoisonedSplit:
    """The samples ASR and RA are measured on: those whose backdoor label differs from the original one (all of
    a BackdoorBench bd_test); without original labels, all of them."""
    if bd_test.original_y is None:
        return bd_test
    keep = bd_test.y != bd_test.original_y
    if bool(keep.all()):
        return bd_test
    return PoisonedSplit(bd_test.x[keep], bd_test.y[keep], bd_test.original_y[keep],
                         None if bd_test.index is None else bd_test.index[keep])


def evaluate_backdoorbench(model: nn.Module, clean_test: Optional[TensorPair], bd_test: Optional[PoisonedSplit],
                           batch_size: int = 256) -> dict[str, float]:
    """``{"acc", "asr", "ra"}`` in percent with BackdoorBench's definitions (module docstring); NaN where the
    data for one are missing. ``model`` takes images in [0, 1] (``result.model``)."""
    metrics = {"acc": float("nan"), "asr": float("nan"), "ra": float("nan")}
    if clean_test is not None:
        metrics["acc"] = accuracy(predict(model, clean_test[0], batch_size), clean_test[1])
    if bd_test is not None:
        split = attack_test_split(bd_test)
        predictions = predict(model, split.x, batch_size)
        metrics["asr"] = accuracy(predictions, split.y)
        if split.original_y is not None:
            metrics["ra"] = accuracy(predictions, split.original_y)
    return metrics


# --- defense_result.pt --------------------------------------------------------------------------------------------


def default_defense_dir(record_dir: PathLike, name: str = DEFENSE_NAME) -> Path:
    """Where BackdoorBench's defenses put their result: ``RECORD_DIR/defense/<name>/`` (``tsc_fast`` here)."""
    return Path(record_dir) / "defense" / name


def bare_network(model: nn.Module) -> nn.Module:
    """The network inside normalisation and (Distributed)DataParallel wrappers: what BackdoorBench saves."""
    while True:
        if isinstance(model, NormalizedModel):
            model = model.network
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else ("" if key == "module" else key)


def defense_state_dict(network: nn.Module) -> "collections.OrderedDict[str, torch.Tensor]":
    """The bare network's state_dict as compact plain CPU tensors, keys without ``module.``, version metadata kept."""
    source = bare_network(network).state_dict()
    state: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in source.items():
        tensor = value.detach().to("cpu", copy=True).contiguous()
        state[_strip(key)] = tensor.as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:  # BatchNorm & co. read their format version from it
        renamed = collections.OrderedDict((_strip(k), dict(v)) for k, v in metadata.items())
        state._metadata = renamed  # type: ignore[attr-defined]
    return state


def _check_loadable(state: dict[str, torch.Tensor], model_name: str, num_classes: int, in_channels: int) -> None:
    """What visual_metric.py does, without the weights: the keys and shapes of generate_cls_model's network."""
    with torch.device("meta"):  # structure only: no memory, no init cost
        reference = build_backdoorbench_network(model_name, num_classes, in_channels).state_dict()
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    wrong = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"the network is not BackdoorBench's {model_name} with {num_classes} classes: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]}")


def _atomic_torch_save(obj: Any, file: Path) -> None:
    """torch.save to a hidden temporary file in the same folder, flushed, then renamed over ``file``."""
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the result from other users of the record
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_defense_result(path: PathLike, network: nn.Module, model_name: str, num_classes: int,
                        in_channels: int = 3) -> Path:
    """Write ``defense_result.pt`` as BackdoorBench's defenses do: ``{"model_name", "num_classes", "model"}``.

    ``path``: a folder (the file goes in it, e.g. :func:`default_defense_dir`) or a file path ending in ``.pt``.
    ``network``: the purified network; normalisation / DataParallel wrappers are removed, so the keys are those of
    BackdoorBench's model definition and ``analysis/visual_metric.py`` loads it strictly into
    ``generate_cls_model(model_name, num_classes)``; plain tensors only (``torch.load(weights_only=True)`` reads
    it). Checked against that architecture before writing (ValueError if it would not load); written atomically.
    Returns the file's path.
    """
    target = Path(path).expanduser()
    file = target if target.suffix == ".pt" else target / DEFENSE_RESULT_FILE
    state = defense_state_dict(network)
    _check_loadable(state, model_name, int(num_classes), in_channels)
    _atomic_torch_save({"model_name": str(model_name), "num_classes": int(num_classes), "model": state}, file)
    return file


def read_defense_result(path: PathLike) -> dict[str, Any]:
    """Read a ``defense_result.pt`` (or its folder) with ``torch.load(weights_only=True)`` and check its form."""
    file = Path(path).expanduser()
    file = file / DEFENSE_RESULT_FILE if file.is_dir() else file
    try:
        contents = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{str(file)!r} is not a defense result readable with weights_only=True: {error}") from None
    if not isinstance(contents, dict) or not {"model_name", "num_classes", "model"} <= set(contents):
        raise ValueError(f"{str(file)!r} is not a BackdoorBench defense result (model_name, num_classes, model)")
    return contents
