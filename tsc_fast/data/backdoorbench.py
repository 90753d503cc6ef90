"""Import BackdoorBench attack results (``attack_result.pt``) safely, without retraining.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks; github.com/SCLBD/BackdoorBench) runs every attack
from its repository root and saves it as ``./record/<name>/attack_result.pt`` (``utils/save_load_attack.py``,
``save_attack_result``): a ``torch.save`` dict with

- ``model_name`` (``"preactresnet18"``, ``"resnet18"``, ``"vgg19_bn"``, ...), ``num_classes``, ``model`` (the
  state_dict; keys may carry DataParallel's ``module.`` prefix), ``clean_data`` (dataset name, e.g. ``"cifar10"``),
  ``img_size`` (``(H, W, C)``, a tuple in 2.x), ``data_path`` (e.g. ``"./data/cifar10"``, relative to the
  repository root);
- ``bd_train`` / ``bd_test``: in BackdoorBench 2.x the state of ``prepro_cls_DatasetBD_v2`` (``utils/bd_dataset_v2.py``,
  ``retrieve_state``): ``{"bd_data_container": {"data_dict": {index: (PIL image, backdoor label, original label)}
  or {index: {"path": png, "other_info": [backdoor label, original label]}}, "save_folder_path", ...},
  "original_index_array", "poison_indicator", ...}``. Only POISONED samples are in ``data_dict`` (its keys are
  numpy or Python ints: positions in the clean split); ``poison_indicator`` (one 0/1 per clean sample) and
  ``original_index_array`` (the clean positions the dataset iterates) describe the whole split, so the full
  poisoned training set is the clean training set (``data_path``) with the ``data_dict`` samples swapped in. Attacks
  that write PNGs record their paths relative to the repository root, ``./record/<name>/bd_test_dataset/<original
  label>/<index>.png``. In 1.x ``bd_test`` / ``bd_train`` are ``{"x": images, "y": labels, "original_index",
  "original_targets"}`` with ``x`` a list of PIL images or an (N, C, H, W) tensor of 0..255 values.

PNG paths are resolved against the record's own folder first (the longest tail of the recorded path that exists
there), and only then as recorded (relative to the current directory, as BackdoorBench reads them): a folder that
happens to hold its own ``./record/<same name>/`` never supplies the images. The number of poisoned images must
match ``poison_indicator`` / ``original_index_array`` and every image must have the shape ``img_size`` says;
a split that does not is skipped with a note saying why.

Safety: the file is read with ``torch.load(weights_only=True)`` only (BackdoorBench's own ``load_attack_result``
needs full unpickling and fails under that default). Numpy arrays/scalars are allow-listed (their reconstruction
runs no code), PIL images are read as inert records of (mode, size, raw bytes) and decoded with
``np.frombuffer``, and EVERY other global the file names is mapped to an inert placeholder that runs nothing:
such entries are dropped and listed in ``result.notes``. The model weights must be plain tensors.

Architectures (``utils/aggregate_block/model_trainer_generate.py``, ``generate_cls_model``): ``preactresnet18`` ->
this package's :class:`PreActResNet18` (BackdoorBench's ``models/preact_resnet.py`` has the same parameter names:
``conv1``, ``layerK.J.{bn1,conv1,bn2,conv2,shortcut.0}``, ``linear``); the torchvision names in
:data:`TORCHVISION_ARCHITECTURES` -> torchvision's builder of that name with ``num_classes``, unchanged (also on
32x32 inputs: ResNet-18 keeps its 7x7 stride-2 stem and max-pool); ``vit_b_16`` / ``vit_b_32`` / ``vit_l_16`` /
``vit_l_32`` -> ``Sequential(resize to 224x224, torchvision ViT with a num_classes head)``, so their keys start
with ``1.`` as BackdoorBench's do; TSC's fork adds ``pretrained-resnet18``, ``pretrained-resnet50`` and
``VGG19BN`` (torchvision's, last layer replaced: the same keys). Names BackdoorBench knows but we do not build: ``googlenet`` and
``inception_v3`` (auxiliary outputs in training mode), ``resnext29`` and ``senet18`` (BackdoorBench's own
definitions). BackdoorBench normalises inputs in its data transforms (CIFAR-10: mean (0.4914, 0.4822, 0.4465), std
(0.247, 0.243, 0.261); GTSRB: none); ``result.model`` puts that normalisation in front of the network so it takes
images in [0, 1] like the rest of tsc_fast, and ``result.network`` is the bare network.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import PreActResNet18
from ..normalization import NormalizedModel

PathLike = Union[str, Path]
TensorPair = tuple[torch.Tensor, torch.Tensor]

ATTACK_RESULT_FILE = "attack_result.pt"

# BackdoorBench's input normalisation per dataset (its dataset_and_transform_generate); None: no normalisation.
NORMALIZATION: dict[str, Optional[tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "gtsrb": None,
    "celeba": None,
}

PIL_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
MAX_IMAGE_PIXELS = 4096 * 4096
VIT_INPUT_SIDE = 224  # generate_cls_model puts Resize((224, 224)) in front of every ViT


# --- architectures ------------------------------------------------------------------------------------------------

# generate_cls_model's names that call the torchvision builder of the same name with num_classes and nothing else.
TORCHVISION_ARCHITECTURES = (
    "resnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg16", "vgg19", "vgg19_bn", "squeezenet1_0",
    "densenet121", "densenet161", "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_large", "resnext50_32x4d",
    "wide_resnet50_2", "mnasnet1_0", "efficientnet_b0", "efficientnet_b3", "convnext_tiny",
)
VIT_ARCHITECTURES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")


def _torchvision_model(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision.models as tv_models
    except ImportError as error:  # pragma: no cover - torchvision is a test dependency
        raise ImportError(f"BackdoorBench's {name} is torchvision's; install torchvision (tsc-fast[vision])") from error
    return getattr(tv_models, name)


def _require_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"BackdoorBench's {name} takes 3-channel images, the result says {in_channels}")


class ResizeTo(nn.Module):
    """Bilinear resize of a batch to ``size`` (what torchvision's ``Resize`` does to tensors; no state, traceable)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)


def _preact(name: str, num_classes: int, in_channels: int) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, in_channels=in_channels)


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    _require_rgb(name, in_channels)
    return _torchvision_model(name)(weights=None, num_classes=num_classes)


def _vit(name: str, num_classes: int, in_channels: int) -> nn.Module:
    # generate_cls_model: Sequential(Resize((224, 224)), vit with heads.head = Linear(hidden, num_classes));
    # torchvision's num_classes head is that same Linear, so the keys are "1.<vit key>" either way
    _require_rgb(name, in_channels)
    vit = _torchvision_model(name)(weights=None, num_classes=num_classes)
    return nn.Sequential(ResizeTo((VIT_INPUT_SIDE, VIT_INPUT_SIDE)), vit)


def _alias(torchvision_name: str) -> Callable[[str, int, int], nn.Module]:
    return lambda name, num_classes, in_channels: _torchvision(torchvision_name, num_classes, in_channels)


ARCHITECTURES: dict[str, Callable[[str, int, int], nn.Module]] = {
    "preactresnet18": _preact,
    **{name: _torchvision for name in TORCHVISION_ARCHITECTURES},
    **{name: _vit for name in VIT_ARCHITECTURES},
    # TSC's fork (JiePeng104/TSC): ImageNet-pretrained torchvision models whose last layer is replaced by a
    # num_classes Linear, i.e. the same structure and key names as the builder with num_classes
    "pretrained-resnet18": _alias("resnet18"),
    "pretrained-resnet50": _alias("resnet50"),
    "vgg19bn": _alias("vgg19_bn"),
}


def build_backdoorbench_network(model_name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network BackdoorBench's ``generate_cls_model`` builds for ``model_name`` (random weights).

    Raises ValueError for a name outside :data:`ARCHITECTURES` (the message lists them).
    """
    name = str(model_name).lower()
    if name not in ARCHITECTURES:
        raise ValueError(
            f"BackdoorBench model {model_name!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name](name, int(num_classes), int(in_channels))


# --- safe reading -------------------------------------------------------------------------------------------------


class PILImageRecord:
    """Stands in for a pickled ``PIL.Image.Image``: keeps its (mode, size, raw bytes) state, decodes nothing itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_array(self) -> np.ndarray:
        """The image as uint8 (C, H, W); raises ValueError for an unexpected mode, size or byte count."""
        state = self.state
        if not isinstance(state, (list, tuple)) or len(state) < 4:
            raise ValueError("unrecognised PIL image state")
        mode, size, data = state[1], state[2], state[-1]
        if mode not in PIL_MODES or not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"unsupported PIL image mode {mode!r}")
        width, height = (int(s) for s in size)
        if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"implausible image size {size}")
        channels = PIL_MODES[mode]
        if len(data) != width * height * channels:
            raise ValueError(f"image data holds {len(data)} bytes, expected {width * height * channels}")
        array = np.frombuffer(bytes(data), dtype=np.uint8).reshape(height, width, channels)
        return array.transpose(2, 0, 1).copy()


class RefusedObject:
    """Stands in for any global that is not allow-listed: accepts whatever the pickle passes and does nothing."""

    refused_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<refused {self.refused_name}>"


def _numpy_safe_globals() -> list[Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                            np.uint32, np.uint64, np.float16, np.float32, np.float64, object, "U1",
                                            "S1")]
    return [reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def _placeholders(names: Sequence[str]) -> list[tuple[type, str]]:
    entries = []
    for name in names:
        if name == "PIL.Image.Image":
            entries.append((PILImageRecord, name))
        else:
            entries.append((type("Refused", (RefusedObject,), {"refused_name": name}), name))
    return entries


def _attack_result_file(path: PathLike) -> Path:
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / ATTACK_RESULT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no BackdoorBench attack result at {str(file)!r} (expected {ATTACK_RESULT_FILE})")
    return file


def read_attack_result(path: PathLike) -> tuple[dict, list[str]]:
    """Read ``attack_result.pt`` (or a folder holding it) safely; returns ``(contents, refused global names)``.

    See the module docstring for what is allowed. Raises ValueError for a file that is not a torch.save archive
    or that needs unpickling torch refuses even as a placeholder (``os.system``, ``builtins.eval``, ...).
    """
    file = _attack_result_file(path)
    raw = file.read_bytes()
    numpy_globals = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(numpy_globals):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    except (ValueError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"{str(file)!r} is not a torch.save archive: {error}") from None
    refused = sorted(name for name in unsafe if name != "PIL.Image.Image")
    try:
        with torch.serialization.safe_globals(numpy_globals + _placeholders(unsafe)):
            contents = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch refuses some modules (os, subprocess, builtins.eval ...) even as placeholders: refuse the file
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[-1] if reason else "")
        raise ValueError(
            f"refusing {str(file)!r}: it needs unpickling that is not safe ({detail.strip()}); "
            f"globals named: {', '.join(unsafe) or 'none'}"
        ) from None
    if not isinstance(contents, dict):
        raise ValueError(f"{str(file)!r} does not hold a dict; not a BackdoorBench attack result")
    return contents, refused


# --- decoding -------------------------------------------------------------------------------------------------


@dataclass
class PoisonedSplit:
    """Poisoned images of one split, in the order of their clean positions.

    ``x`` float32 (N, C, H, W) in [0, 1]; ``y`` the labels the attack gave them; ``original_y`` their true labels
    (None when not recorded); ``index`` their positions in the clean split (None when not recorded).
    ``poison_indicator`` (bool, one per clean sample) and ``original_index_array`` (the clean positions
    BackdoorBench's dataset iterates) are the record's own, where it has them: with them and the clean split the
    whole poisoned split can be rebuilt (``bd_train`` holds only the poisoned samples).
    """

    x: torch.Tensor
    y: torch.Tensor
    original_y: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    poison_indicator: Optional[torch.Tensor] = None
    original_index_array: Optional[torch.Tensor] = None

    def tensors(self) -> TensorPair:
        return self.x, self.y

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class BackdoorBenchResult:
    """An imported BackdoorBench attack (see the module docstring).

    ``model`` takes images in [0, 1] (BackdoorBench's normalisation, then ``network``); ``network`` is the bare
    architecture with the imported weights; ``bd_test`` / ``bd_train`` the poisoned images where they could be
    read; ``notes`` says what was skipped and why; ``record_dir`` is the folder of ``attack_result.pt`` and
    ``data_path`` the record's clean-data path as saved (relative to BackdoorBench's repository root).
    """

    model: nn.Module
    network: nn.Module
    model_name: str
    num_classes: int
    dataset: str
    image_shape: tuple[int, int, int]
    normalization: Optional[tuple[tuple[float, ...], tuple[float, ...]]]
    bd_test: Optional[PoisonedSplit]
    bd_train: Optional[PoisonedSplit]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    record_dir: Optional[Path] = None
    data_path: Optional[str] = None


def _image_shape(img_size: Any) -> tuple[int, int, int]:
    """BackdoorBench's ``img_size`` ``(H, W, C)`` (tuple, list or array; numpy ints allowed) -> (C, H, W)."""
    try:
        height, width, channels = (int(v) for v in list(np.asarray(img_size).reshape(-1))[:3])
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be (H, W, C), got {img_size!r}") from None
    if min(height, width, channels) < 1:
        raise ValueError(f"img_size must be positive (H, W, C), got {img_size!r}")
    return channels, height, width


def _strip_module_prefix(state_dict: dict) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model weight {key!r} is a {type(value).__name__}, not a tensor; refusing the model")
        key = str(key)
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned


def _listing(names: Sequence[str], limit: int = 6) -> str:
    return f"{list(names[:limit])}{' ...' if len(names) > limit else ''}"


def _rename_by_position(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Optional[dict]:
    """BackdoorBench's load_attack_result renames keys by position when the count matches; we also need every
    shape to match, so only a pure renaming is accepted. None when it is not one."""
    if len(state_dict) != len(expected):
        return None
    pairs = list(zip(state_dict.items(), expected.items()))
    if any(tuple(value.shape) != tuple(ref.shape) for (_, value), (_, ref) in pairs):
        return None
    return {name: value for (_, value), (name, _) in pairs}


def _load_weights(network: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str, notes: list[str]) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        renamed = _rename_by_position(state_dict, expected)
        if renamed is None:
            raise ValueError(f"the saved {model_name} weights do not match the architecture: missing "
                             f"{_listing(missing)}, unexpected {_listing(unexpected)}")
        notes.append(f"weights renamed by position to {model_name}'s key names (as BackdoorBench's loader does): "
                     f"{len(unexpected)} names differed, all shapes match")
        state_dict = renamed
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"the saved {model_name} weights have other shapes than the architecture: "
                         f"{_listing(wrong, 4)}")
    network.load_state_dict(state_dict, strict=True)


def _as_label(value: Any) -> int:
    if isinstance(value, (int, np.integer)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return int(value)
    raise ValueError(f"a label must be an integer, got {type(value).__name__}")


def _resolve_image_path(saved: str, record_folder: Path) -> Optional[Path]:
    """A PNG saved by BackdoorBench: the longest tail of the recorded path (at least ``<label>/<file>``) found
    under the record folder, else the recorded path itself (relative to the current directory, or absolute).

    The record folder comes first because BackdoorBench records ``./record/<name>/bd_test_dataset/...`` relative to
    ITS working directory: read relative to ours first, another record of the same name would supply the images.
    """
    recorded = Path(saved)
    parts = recorded.parts[1:] if recorded.anchor else recorded.parts
    for count in range(len(parts), 1, -1):
        tail = parts[-count:]
        if ".." in tail:  # a tail must stay inside the record folder
            continue
        candidate = record_folder.joinpath(*tail)
        if candidate.is_file():
            return candidate
    return recorded if recorded.is_file() else None


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image.convert("L" if image.mode == "L" else "RGB"), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _image_array(image: Any) -> np.ndarray:
    """One stored image (PIL record, HWC/CHW array or tensor) -> uint8 (C, H, W)."""
    if isinstance(image, PILImageRecord):
        return image.to_array()
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
            array = array.transpose(2, 0, 1)
        if array.ndim != 3:
            raise ValueError(f"an image must have 2 or 3 dimensions, got shape {array.shape}")
        return np.clip(array, 0, 255).astype(np.uint8)
    raise ValueError(f"cannot read an image stored as {type(image).__name__}")


def _decode_container_entry(value: Any, record_folder: Path) -> tuple[np.ndarray, int, Optional[int]]:
    """One entry of BackdoorBench 2.x's data_dict -> (uint8 (C, H, W), backdoor label, original label)."""
    if isinstance(value, dict) and "path" in value:
        path = _resolve_image_path(str(value["path"]), record_folder)
        if path is None:
            raise ValueError(f"poisoned image file {value['path']!r} not found under {str(record_folder)!r} "
                             "nor where recorded")
        info = list(value.get("other_info", []))
        if not info:
            raise ValueError(f"no labels recorded for {value['path']!r}")
        return _read_png(path), _as_label(info[0]), _as_label(info[1]) if len(info) > 1 else None
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        return _image_array(value[0]), _as_label(value[1]), _as_label(value[2]) if len(value) > 2 else None
    raise ValueError(f"unrecognised data_dict entry of type {type(value).__name__}")


def _index_array(value: Any, what: str) -> Optional[np.ndarray]:
    """A recorded index/indicator array (numpy, tensor or list) -> 1-D int64 array; None stays None."""
    if value is None:
        return None
    try:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        array = np.asarray([])
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be a 1-D numeric array, got {type(value).__name__}")
    if not np.all(array == np.round(array)):
        raise ValueError(f"{what} must hold integers")
    return array.astype(np.int64)


def _expected_poisoned(indicator: Optional[np.ndarray], order: Optional[np.ndarray]) -> Optional[list[int]]:
    """The clean positions whose poisoned version the dataset serves: those of ``original_index_array`` (all, if
    absent) that ``poison_indicator`` marks; None when the record has no indicator."""
    if indicator is None:
        return None
    if np.any((indicator != 0) & (indicator != 1)):
        raise ValueError("poison_indicator must hold only 0 and 1")
    positions = np.arange(len(indicator)) if order is None else order
    if len(positions) and (positions.min() < 0 or positions.max() >= len(indicator)):
        raise ValueError(f"original_index_array points outside poison_indicator's {len(indicator)} samples")
    return sorted(int(i) for i in positions if indicator[i] == 1)


def _check_images(arrays: Sequence[np.ndarray], indices: Sequence[int], expected_shape: Optional[tuple]) -> None:
    """Every image must have the record's (C, H, W) (or, without img_size, one common shape)."""
    reference = tuple(expected_shape) if expected_shape is not None else tuple(arrays[0].shape)
    for array, index in zip(arrays, indices):
        if tuple(array.shape) != reference:
            source = "the record's img_size says" if expected_shape is not None else "the first image is"
            raise ValueError(f"poisoned image {index} has shape {tuple(array.shape)} (C, H, W), {source} {reference}")


def _decode_container(state: dict, record_folder: Path, expected_shape: Optional[tuple]) -> PoisonedSplit:
    data_dict = state["bd_data_container"]["data_dict"]
    if not isinstance(data_dict, dict) or not data_dict:
        raise ValueError("empty poisoned-data container")
    keys = {int(k): k for k in data_dict}
    indicator = _index_array(state.get("poison_indicator"), "poison_indicator")
    order = _index_array(state.get("original_index_array"), "original_index_array")
    expected = _expected_poisoned(indicator, order)
    if expected is not None and expected != sorted(keys):
        missing, extra = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
        raise ValueError(f"the record marks {len(expected)} samples as poisoned (poison_indicator / "
                         f"original_index_array) but its data_dict holds {len(keys)} (missing {_listing(missing)}, "
                         f"not marked {_listing(extra)})")
    indices = sorted(keys)
    decoded = [_decode_container_entry(data_dict[keys[i]], record_folder) for i in indices]
    _check_images([d[0] for d in decoded], indices, expected_shape)
    x = torch.from_numpy(np.stack([d[0] for d in decoded])).float() / 255.0
    y = torch.tensor([d[1] for d in decoded], dtype=torch.int64)
    originals = [d[2] for d in decoded]
    original_y = None if any(o is None for o in originals) else torch.tensor(originals, dtype=torch.int64)
    return PoisonedSplit(
        x, y, original_y, torch.tensor(indices, dtype=torch.int64),
        poison_indicator=None if indicator is None else torch.from_numpy(indicator == 1),
        original_index_array=None if order is None else torch.from_numpy(order),
    )


def _labels(value: Any, what: str) -> Optional[torch.Tensor]:
    if value is None:
        return None
    array = _index_array(value, what)
    return torch.from_numpy(array)


def _legacy_images(x: Any) -> torch.Tensor:
    """1.x ``x``: an (N, C, H, W) / (N, H, W, C) tensor or array of 0..255 (or 0..1 floats), or a list of images."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("no images in 'x'")
        return torch.from_numpy(np.stack([_image_array(image) for image in x])).float() / 255.0
    if not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim != 4:
        raise ValueError("expected 'x' as an (N, C, H, W) tensor or a list of images")
    tensor = torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    integer = not tensor.dtype.is_floating_point
    tensor = tensor.float()
    if integer or float(tensor.max()) > 1.0 + 1e-6:  # raw 0..255 pixel values
        tensor = tensor / 255.0
    return tensor.clamp(0.0, 1.0).contiguous()


def _decode_tensors(state: dict, expected_shape: Optional[tuple]) -> Optional[PoisonedSplit]:
    if state["x"] is None:  # 1.x saves bd_train as {"x": None, ...} when there is none
        return None
    x = _legacy_images(state["x"])
    y = _labels(state["y"], "y")
    original_y = _labels(state.get("original_targets"), "original_targets")
    index = _labels(state.get("original_index"), "original_index")
    lengths = {"x": len(x), "y": len(y)}
    for name, values in (("original_targets", original_y), ("original_index", index)):
        if values is not None:
            lengths[name] = len(values)
    if index is not None and len(index) != len(x) and state.get("poison_indicator") is not None:
        # 1.x's "alternative saving": original_index covers the whole split; its poisoned positions are the images'
        indicator = _index_array(state["poison_indicator"], "poison_indicator")
        if len(indicator) == len(index):
            index = index[torch.from_numpy(indicator == 1)]
            lengths["original_index"] = len(index)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the 1.x split's entries have different lengths: {lengths}")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise ValueError(f"poisoned images have shape {tuple(x.shape[1:])} (C, H, W), the record's img_size says "
                         f"{tuple(expected_shape)}")
    return PoisonedSplit(x, y, original_y, index)


def _decode_split(state: Any, record_folder: Path, what: str, notes: list[str],
                  expected_shape: Optional[tuple]) -> Optional[PoisonedSplit]:
    """BackdoorBench's saved bd_train / bd_test (2.x container or 1.x tensors) -> PoisonedSplit, or None + a note."""
    if state is None:
        return None
    if isinstance(state, RefusedObject):
        notes.append(f"{what}: stored as {state.refused_name}, which is not read safely; skipped")
        return None
    try:
        if isinstance(state, dict) and "bd_data_container" in state:
            return _decode_container(state, record_folder, expected_shape)
        if isinstance(state, dict) and "x" in state and "y" in state:
            return _decode_tensors(state, expected_shape)
    except (ValueError, TypeError, KeyError, OSError) as error:
        notes.append(f"{what}: could not be imported ({error}); skipped")
        return None
    notes.append(f"{what}: unrecognised format ({type(state).__name__}); skipped")
    return None


def import_backdoorbench(path: PathLike, wrap_normalization: bool = True) -> BackdoorBenchResult:
    """Import a BackdoorBench attack record folder (or its ``attack_result.pt``).

    Returns a :class:`BackdoorBenchResult` with the backdoored model, ready for ``tsc_fast.purify``. With
    ``wrap_normalization`` (default) ``result.model`` includes the dataset's input normalisation and takes images
    in [0, 1]; otherwise ``result.model`` is the bare network. Raises ValueError when the weights cannot be
    imported (unsupported architecture, refused or mismatching weights). Poisoned splits that cannot be read
    (missing PNGs, a count or shape the record contradicts) are None, with a note in ``result.notes``.
    """
    file = _attack_result_file(path)
    record_folder = file.parent.resolve()
    contents, refused = read_attack_result(file)
    notes = [f"refused to unpickle {name}: not allow-listed; the entries holding it were skipped" for name in refused]
    for key in ("model_name", "num_classes", "model"):
        if key not in contents:
            keys = sorted(map(str, contents))[:10]
            raise ValueError(f"not a BackdoorBench attack result: no {key!r} entry (keys: {keys})")
    model_name = str(contents["model_name"])  # as recorded: generate_cls_model's names are case-sensitive
    num_classes = int(contents["num_classes"])
    dataset = str(contents.get("clean_data", "unknown")).lower()
    has_size = contents.get("img_size") is not None
    image_shape = _image_shape(contents["img_size"]) if has_size else (3, 32, 32)
    if not isinstance(contents["model"], dict):
        raise ValueError(f"the 'model' entry is a {type(contents['model']).__name__}, not a state_dict; refusing it")
    network = build_backdoorbench_network(model_name, num_classes, image_shape[0])
    _load_weights(network, _strip_module_prefix(contents["model"]), model_name, notes)
    network.eval()
    normalization = NORMALIZATION.get(dataset)
    if dataset not in NORMALIZATION:
        notes.append(f"unknown dataset {dataset!r}: no input normalisation applied")
    model: nn.Module = network
    if wrap_normalization and normalization is not None:
        model = NormalizedModel(network, *normalization).eval()
    expected_shape = image_shape if has_size else None
    bd_test = _decode_split(contents.get("bd_test"), record_folder, "bd_test", notes, expected_shape)
    bd_train = _decode_split(contents.get("bd_train"), record_folder, "bd_train", notes, expected_shape)
    extra = {str(k): v for k, v in contents.items()
             if k not in ("model", "bd_test", "bd_train") and isinstance(v, (str, int, float, bool, list, tuple))}
    data_path = contents.get("data_path")
    return BackdoorBenchResult(
        model=model, network=network, model_name=model_name, num_classes=num_classes, dataset=dataset,
        image_shape=image_shape, normalization=normalization, bd_test=bd_test, bd_train=bd_train, notes=notes,
        extra=extra, record_dir=record_folder, data_path=str(data_path) if isinstance(data_path, str) else None,
    )
