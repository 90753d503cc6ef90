"""Import BackdoorBench attack results (``attack_result.pt``) safely, without retraining.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks; github.com/SCLBD/BackdoorBench) saves every attack
as a folder with ``attack_result.pt``: a ``torch.save`` dict with

- ``model_name`` (``"preactresnet18"``, ``"resnet18"``, ``"vgg19_bn"``, ...), ``num_classes``, ``model`` (the
  state_dict; keys may carry DataParallel's ``module.`` prefix), ``clean_data`` (dataset name, e.g. ``"cifar10"``),
  ``img_size`` (``[H, W, C]``), ``data_path``;
- ``bd_train`` / ``bd_test``: in BackdoorBench 2.x the state of its poisoned dataset wrapper: ``{"bd_data_container":
  {"data_dict": {index: (PIL image, backdoor label, original label)} or {index: {"path": png, "other_info": [backdoor
  label, original label]}}, "save_folder_path", ...}, "original_index_array", "poison_indicator", ...}``; in 1.x a
  dict ``{"x": float tensor (N, C, H, W) in 0..255, "y": labels}``.

Safety: the file is read with ``torch.load(weights_only=True)``. Numpy arrays/scalars are allow-listed (their
reconstruction runs no code), PIL images are read as inert records of (mode, size, raw bytes) and decoded with
``Image.frombytes``, and EVERY other global the file names is mapped to an inert placeholder that runs nothing:
such entries are dropped and listed in ``result.notes``. The model weights must be plain tensors.

Architectures: ``preactresnet18`` -> this package's :class:`PreActResNet18` (BackdoorBench's parameter names are
the same: ``conv1``, ``layerK.J.{bn1,conv1,bn2,conv2,shortcut.0}``, ``linear``); ``resnet18`` and ``vgg19_bn`` ->
torchvision's ``resnet18`` / ``vgg19_bn`` with ``num_classes`` (BackdoorBench uses torchvision's ImageNet
definitions unchanged, also on 32x32 inputs: ResNet-18 keeps its 7x7 stride-2 stem and max-pool). BackdoorBench
normalises inputs in its data transforms (CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.247, 0.243, 0.261); GTSRB:
none); ``result.model`` puts that normalisation in front of the network so it takes images in [0, 1] like the rest
of tsc_fast, and ``result.network`` is the bare network.
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

from .models import PreActResNet18

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


# --- architectures ------------------------------------------------------------------------------------------------


def _torchvision_model(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision.models as tv_models
    except ImportError as error:  # pragma: no cover - torchvision is a test dependency
        raise ImportError(f"BackdoorBench's {name} is torchvision's; install torchvision (tsc-fast[vision])") from error
    return getattr(tv_models, name)


def _preact(num_classes: int, in_channels: int) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, in_channels=in_channels)


def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    _require_rgb("resnet18", in_channels)
    return _torchvision_model("resnet18")(num_classes=num_classes)


def _vgg19_bn(num_classes: int, in_channels: int) -> nn.Module:
    _require_rgb("vgg19_bn", in_channels)
    return _torchvision_model("vgg19_bn")(num_classes=num_classes)


def _require_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"BackdoorBench's {name} takes 3-channel images, the result says {in_channels}")


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "preactresnet18": _preact,
    "resnet18": _resnet18,
    "vgg19_bn": _vgg19_bn,
}


def build_backdoorbench_network(model_name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The network BackdoorBench builds for ``model_name`` (``preactresnet18``, ``resnet18``, ``vgg19_bn``)."""
    try:
        builder = ARCHITECTURES[str(model_name).lower()]
    except KeyError:
        raise ValueError(
            f"BackdoorBench model {model_name!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None
    return builder(int(num_classes), int(in_channels))


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel (constants, not saved in the state_dict)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"need as many positive stds as means, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A network that expects normalised inputs, made to take images in [0, 1]: ``network(normalize(x))``."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))


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


def read_attack_result(path: PathLike) -> tuple[dict, list[str]]:
    """Read ``attack_result.pt`` (or a folder holding it) safely; returns ``(contents, refused global names)``.

    See the module docstring for what is allowed. Raises ValueError for a file that is not a torch.save archive.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / ATTACK_RESULT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no BackdoorBench attack result at {str(file)!r} (expected {ATTACK_RESULT_FILE})")
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
    """Poisoned images of one split: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` the labels the attack gave them,
    ``original_y`` their true labels (None when not recorded), ``index`` their positions in the clean split (None
    when not recorded)."""

    x: torch.Tensor
    y: torch.Tensor
    original_y: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None

    def tensors(self) -> TensorPair:
        return self.x, self.y


@dataclass
class BackdoorBenchResult:
    """An imported BackdoorBench attack (see the module docstring).

    ``model`` takes images in [0, 1] (BackdoorBench's normalisation, then ``network``); ``network`` is the bare
    architecture with the imported weights; ``bd_test`` / ``bd_train`` the poisoned images where they could be
    read; ``notes`` says what was skipped and why.
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


def _image_shape(img_size: Any) -> tuple[int, int, int]:
    """BackdoorBench's ``img_size`` ``[H, W, C]`` -> (C, H, W)."""
    try:
        height, width, channels = (int(v) for v in list(img_size)[:3])
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be [H, W, C], got {img_size!r}") from None
    return channels, height, width


def _strip_module_prefix(state_dict: dict) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model weight {key!r} is a {type(value).__name__}, not a tensor; refusing the model")
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned


def _load_weights(network: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str) -> None:
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the saved {model_name} weights do not match the architecture: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    network.load_state_dict(state_dict, strict=True)


def _as_label(value: Any) -> int:
    if isinstance(value, (int, np.integer)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return int(value)
    raise ValueError(f"a label must be an integer, got {type(value).__name__}")


def _resolve_image_path(saved: str, result_folder: Path) -> Optional[Path]:
    """A poisoned image saved on disk by BackdoorBench: the recorded path, else the same tail under the result folder."""
    recorded = Path(saved)
    if recorded.is_file():
        return recorded
    parts = recorded.parts
    for count in range(1, len(parts) + 1):
        candidate = result_folder.joinpath(*parts[-count:])
        if candidate.is_file():
            return candidate
    return None


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image.convert("L" if image.mode == "L" else "RGB"), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_container_entry(value: Any, result_folder: Path) -> tuple[np.ndarray, int, Optional[int]]:
    """One entry of BackdoorBench 2.x's data_dict -> (uint8 (C, H, W), backdoor label, original label)."""
    if isinstance(value, dict) and "path" in value:
        path = _resolve_image_path(str(value["path"]), result_folder)
        if path is None:
            raise ValueError(f"poisoned image file {value['path']!r} not found")
        info = list(value.get("other_info", []))
        return _read_png(path), _as_label(info[0]), _as_label(info[1]) if len(info) > 1 else None
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        image = value[0]
        if isinstance(image, PILImageRecord):
            array = image.to_array()
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            array = np.asarray(image)
            array = array.transpose(2, 0, 1) if array.ndim == 3 and array.shape[-1] in (1, 3) else array
            array = array.astype(np.uint8)
        else:
            raise ValueError(f"cannot read an image stored as {type(image).__name__}")
        return array, _as_label(value[1]), _as_label(value[2]) if len(value) > 2 else None
    raise ValueError(f"unrecognised data_dict entry of type {type(value).__name__}")


def _decode_split(state: Any, result_folder: Path, what: str, notes: list[str]) -> Optional[PoisonedSplit]:
    """BackdoorBench's saved bd_train / bd_test (2.x container or 1.x tensors) -> PoisonedSplit, or None + a note."""
    if state is None:
        return None
    if isinstance(state, RefusedObject):
        notes.append(f"{what}: stored as {state.refused_name}, which is not read safely; skipped")
        return None
    try:
        if isinstance(state, dict) and "bd_data_container" in state:
            return _decode_container(state, result_folder)
        if isinstance(state, dict) and "x" in state and "y" in state:
            return _decode_tensors(state)
    except (ValueError, TypeError, KeyError, OSError) as error:
        notes.append(f"{what}: could not be imported ({error}); skipped")
        return None
    notes.append(f"{what}: unrecognised format ({type(state).__name__}); skipped")
    return None


def _decode_container(state: dict, result_folder: Path) -> PoisonedSplit:
    data_dict = state["bd_data_container"]["data_dict"]
    if not isinstance(data_dict, dict) or not data_dict:
        raise ValueError("empty poisoned-data container")
    indices = sorted(data_dict, key=int)
    decoded = [_decode_container_entry(data_dict[i], result_folder) for i in indices]
    shapes = {d[0].shape for d in decoded}
    if len(shapes) != 1:
        raise ValueError(f"poisoned images have different shapes {sorted(shapes)[:3]}")
    x = torch.from_numpy(np.stack([d[0] for d in decoded])).float() / 255.0
    y = torch.tensor([d[1] for d in decoded], dtype=torch.int64)
    originals = [d[2] for d in decoded]
    original_y = None if any(o is None for o in originals) else torch.tensor(originals, dtype=torch.int64)
    return PoisonedSplit(x, y, original_y, torch.tensor([int(i) for i in indices], dtype=torch.int64))


def _decode_tensors(state: dict) -> PoisonedSplit:
    x, y = state["x"], state["y"]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 4 or len(x) != len(y):
        raise ValueError("expected 'x' as an (N, C, H, W) tensor and 'y' with N labels")
    x = x.float()
    if float(x.max()) > 1.0 + 1e-6:  # BackdoorBench 1.x stored raw 0..255 pixel values as floats
        x = x / 255.0
    index = state.get("original_index")
    index = torch.as_tensor(np.asarray(index), dtype=torch.int64) if index is not None else None
    return PoisonedSplit(x.clamp(0.0, 1.0), y.long(), None, index)


def import_backdoorbench(path: PathLike, wrap_normalization: bool = True) -> BackdoorBenchResult:
    """Import a BackdoorBench attack result folder (or its ``attack_result.pt``).

    Returns a :class:`BackdoorBenchResult` with the backdoored model, ready for ``tsc_fast.purify``. With
    ``wrap_normalization`` (default) ``result.model`` includes the dataset's input normalisation and takes images
    in [0, 1]; otherwise ``result.model`` is the bare network. Raises ValueError when the weights cannot be
    imported (unsupported architecture, refused or mismatching weights).
    """
    file = Path(path).expanduser()
    result_folder = file if file.is_dir() else file.parent
    contents, refused = read_attack_result(file)
    notes = [f"refused to unpickle {name}: not allow-listed; the entries holding it were skipped" for name in refused]
    for key in ("model_name", "num_classes", "model"):
        if key not in contents:
            raise ValueError(f"not a BackdoorBench attack result: no {key!r} entry (keys: {sorted(contents)[:10]})")
    model_name = str(contents["model_name"]).lower()
    num_classes = int(contents["num_classes"])
    dataset = str(contents.get("clean_data", "unknown")).lower()
    image_shape = _image_shape(contents["img_size"]) if "img_size" in contents else (3, 32, 32)
    if not isinstance(contents["model"], dict):
        raise ValueError(f"the 'model' entry is a {type(contents['model']).__name__}, not a state_dict; refusing it")
    network = build_backdoorbench_network(model_name, num_classes, image_shape[0])
    _load_weights(network, _strip_module_prefix(contents["model"]), model_name)
    network.eval()
    normalization = NORMALIZATION.get(dataset)
    if dataset not in NORMALIZATION:
        notes.append(f"unknown dataset {dataset!r}: no input normalisation applied")
    model: nn.Module = network
    if wrap_normalization and normalization is not None:
        model = NormalizedModel(network, *normalization).eval()
    bd_test = _decode_split(contents.get("bd_test"), result_folder, "bd_test", notes)
    bd_train = _decode_split(contents.get("bd_train"), result_folder, "bd_train", notes)
    extra = {k: v for k, v in contents.items()
             if k not in ("model", "bd_test", "bd_train") and isinstance(v, (str, int, float, bool, list, tuple))}
    return BackdoorBenchResult(
        model=model, network=network, model_name=model_name, num_classes=num_classes, dataset=dataset,
        image_shape=image_shape, normalization=normalization, bd_test=bd_test, bd_train=bd_train, notes=notes,
        extra=extra,
    )
