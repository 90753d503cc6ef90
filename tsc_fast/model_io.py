"""Saving and loading model weights safely.

Checkpoints may come from an attacker, so nothing here runs pickled code: ``.safetensors`` files are read with
safetensors, anything else with ``torch.load(weights_only=True)``, whose restricted unpickler refuses arbitrary
objects. Models are saved as safetensors.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

# Keys under which training scripts commonly nest the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
# Prefixes added by wrappers: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightsFileError(ValueError):
    """The file exists but is not a usable checkpoint (corrupt, unsafe or not a state dict)."""


def save_model(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike) -> Path:
    """Save a model's state dict (parameters and buffers) as safetensors; returns the path written.

    Tensors are copied to contiguous CPU memory (safetensors refuses views and shared storage, e.g. tied weights).
    Missing parent folders are created; the file is written atomically.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # a temporary file renamed over the target: a killed save never leaves a truncated checkpoint
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError, or whatever a corrupt header makes the parser raise
        raise WeightsFileError(f"{path} is not a valid safetensors checkpoint: {error}") from error


def _refusal_reason(error: Exception) -> str:
    """The line of torch's weights-only error that names the refused object (not its advice to disable safety)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (named or lines or ["unknown content"])[0]


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsFileError(
            f"{path} was refused: it is not a plain tensor checkpoint ({_refusal_reason(error)}); tsc_fast never "
            "unpickles arbitrary code: convert it to safetensors or a plain state dict (a model saved whole with "
            "torch.save(model): re-save it as torch.save(model.state_dict(), path) where you trust the file)"
        ) from error
    except Exception as error:  # a corrupt file can fail anywhere in torch's parser
        raise WeightsFileError(
            f"{path} is not a valid checkpoint ({type(error).__name__}: {error})"
        ) from error


def unwrap_state_dict(checkpoint: object, source: str = "checkpoint") -> StateDict:
    """The tensors of a loaded checkpoint: unwraps ``{"state_dict": ...}``-style nesting and strips
    ``module.`` / ``_orig_mod.`` prefixes shared by every key."""
    while isinstance(checkpoint, Mapping):
        nested = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if nested is None:
            break
        checkpoint = nested
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise WeightsFileError(f"{source} does not contain a state dict (got {type(checkpoint).__name__})")
    not_tensors = [str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsFileError(f"{source}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    state = {str(k): v for k, v in checkpoint.items()}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict(path: PathLike) -> StateDict:
    """Read the weights of a checkpoint file (safetensors, or a torch file loaded with ``weights_only=True``).

    Raises FileNotFoundError for a missing file and :class:`WeightsFileError` (a ValueError) for a file that is
    not a valid, safe checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise WeightsFileError(f"checkpoint path is not a file: {path}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"checkpoint file is empty: {path}")
    if path.suffix == SAFETENSORS_SUFFIX or _looks_like_safetensors(path):
        return _read_safetensors(path)
    return unwrap_state_dict(_read_torch(path), source=str(path))


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(missing, unexpected, shape_mismatches)`` of ``state`` against ``model``'s state dict.

    ``shape_mismatches`` lists ``(name, checkpoint_shape, model_shape)``.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        (name, tuple(state[name].shape), tuple(expected[name].shape))
        for name in sorted(set(expected) & set(state))
        if state[name].shape != expected[name].shape
    ]
    return missing, unexpected, shapes


def _describe_mismatch(missing: list, unexpected: list, shapes: list, limit: int = 10) -> str:
    def listed(items: list) -> str:
        shown = ", ".join(str(i) for i in items[:limit])
        return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listed(unexpected)}")
    if shapes:
        parts.append("shape mismatches: " + listed([f"{n} (checkpoint {c} vs model {m})" for n, c, m in shapes]))
    return "; ".join(parts)


def _first_shape_mismatch(model: nn.Module, shapes: list) -> str:
    """The first disagreeing tensor in the model's own order, both shapes, and a hint when only the classifier
    differs in its number of outputs (the usual cause: another class count)."""
    order = {name: i for i, name in enumerate(model.state_dict())}
    name, checkpoint_shape, model_shape = min(shapes, key=lambda s: order[s[0]])
    headline = f"{name}: checkpoint {checkpoint_shape} vs architecture {model_shape}"
    parameters = [n for n, _ in model.named_parameters()]
    classifier = parameters[-1].rpartition(".")[0] if parameters else None
    only_outputs_differ = all(
        n.rpartition(".")[0] == classifier and len(c) == len(m) and c[1:] == m[1:] for n, c, m in shapes
    )
    if classifier is not None and only_outputs_differ:
        headline += (f"; was it trained with another --num-classes? (the checkpoint has {checkpoint_shape[0]} "
                     f"outputs, the architecture {model_shape[0]})")
    return headline + "; "


def load_into(
    model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]], strict: bool = True
) -> nn.Module:
    """Load a checkpoint file (or a state dict) into ``model``; returns the model.

    Raises ValueError naming the missing/unexpected keys (only when ``strict``) and every shape mismatch
    (always) when the checkpoint does not fit the architecture; the first shape mismatch (in the model's order)
    leads the message with both shapes.
    """
    if isinstance(source, Mapping):
        state, name = unwrap_state_dict(source, source="state dict"), "state dict"
    else:
        state, name = load_state_dict(source), str(source)
    missing, unexpected, shapes = state_dict_mismatch(model, state)
    if not strict:
        missing, unexpected = [], []
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {name} does not match the {type(model).__name__} architecture: "
            + (_first_shape_mismatch(model, shapes) if shapes else "")
            + _describe_mismatch(missing, unexpected, shapes)
        )
    model.load_state_dict(state, strict=strict)
    return model
