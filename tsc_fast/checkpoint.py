"""Checkpoints of a purification run: written atomically, verified when read, refused when they do not match.

A checkpoint is three files in one folder: ``ckpt-NNNNNN.safetensors`` (tensors only: safe to read from an
untrusted source), ``ckpt-NNNNNN.json`` (plain data, with the SHA-256 of the tensor file) and ``latest.json``,
which names the newest complete checkpoint. Each file is written to a temporary name, flushed to disk and renamed
over its final name, and ``latest.json`` moves last: a run killed at any instant leaves the previous checkpoint
intact. The checkpoint before the newest is kept as well, the rest are deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as from_bytes
from safetensors.torch import save as to_bytes

FORMAT = 1
LATEST = "latest.json"
KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint folder is empty, corrupt, from another format, or belongs to a different run."""


TMP_MARK = ".tmp-"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(directory: Path) -> None:
    """Make the renames into ``directory`` durable (a crash right after must not lose the new names)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed writer left behind (never those of a writer that is still alive)."""
    for path in directory.glob(f".*{TMP_MARK}*"):
        pid = path.name.rpartition(TMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the plain-data part, in a canonical spelling (edits to the JSON are caught like tensor edits)."""
    return _sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def _latest(directory: Path) -> dict[str, Any] | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        return json.loads(pointer.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{pointer} is not valid JSON ({err}); the checkpoint folder is damaged") from None


def save(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write one checkpoint (tensors + plain-data ``meta``) and make it the newest; returns its JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _latest(directory)
    if previous is not None and (not isinstance(previous, dict) or isinstance(previous.get("index"), bool)
                                 or not isinstance(previous.get("index"), int)):
        raise CheckpointError(f"{directory / LATEST} is damaged (no checkpoint index): move the folder away")
    index = previous["index"] + 1 if previous else 0
    name = f"ckpt-{index:06d}"
    blob = to_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    _write_atomically(directory / f"{name}.safetensors", blob)
    record = {"format": FORMAT, "index": index, "tensors": f"{name}.safetensors", "sha256": _sha256(blob),
              "meta_sha256": _meta_digest(meta), "meta": meta}
    _write_atomically(directory / f"{name}.json", json.dumps(record, indent=1).encode())
    _write_atomically(directory / LATEST, json.dumps({"index": index, "name": name}).encode())
    _fsync_folder(directory)
    _prune(directory, index)
    _remove_stale_temporaries(directory)
    return directory / f"{name}.json"


def _prune(directory: Path, newest: int) -> None:
    for path in directory.glob("ckpt-*.*"):
        try:
            index = int(path.name[5:11])
        except ValueError:
            continue
        if index <= newest - KEEP:
            path.unlink(missing_ok=True)


def load(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint's tensors and meta data; CheckpointError with the reason when it cannot be used."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint folder at {directory}")
    pointer = _latest(directory)
    if pointer is None:
        raise CheckpointError(f"no checkpoint in {directory} ({LATEST} is missing): nothing to resume")
    name = pointer.get("name") if isinstance(pointer, dict) else None
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{directory / LATEST} does not name a checkpoint of this folder; it is damaged")
    record_path = directory / f"{name}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint record {record_path} cannot be read: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{record_path} has checkpoint format {found!r}; this version reads format {FORMAT}")
    if not isinstance(record.get("meta"), dict) or record.get("meta_sha256") != _meta_digest(record["meta"]):
        raise CheckpointError(f"{record_path} was modified or damaged: its run state does not match the digest "
                              "recorded with it; resume from an intact checkpoint or start afresh in another folder")
    if not isinstance(record.get("tensors"), str) or not isinstance(record.get("sha256"), str) or \
            Path(record["tensors"]).name != record["tensors"]:
        raise CheckpointError(f"{record_path} does not name its tensor file and digest properly")
    tensor_path = directory / record["tensors"]
    try:
        blob = tensor_path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint tensors {tensor_path} cannot be read: {err}") from None
    if _sha256(blob) != record["sha256"]:
        raise CheckpointError(f"{tensor_path} is corrupt: its SHA-256 does not match the one recorded in "
                              f"{record_path.name}")
    try:
        tensors = from_bytes(blob)
    except SafetensorError as err:
        raise CheckpointError(f"{tensor_path} is not a valid safetensors file: {err}") from None
    return tensors, record["meta"]


def check_same_run(saved: dict[str, Any], current: dict[str, Any], directory: str | Path) -> None:
    """Refuse to resume when what defines the run (model, data, settings) differs from the checkpoint's."""
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing[:4])
        raise CheckpointError(f"the checkpoint in {directory} belongs to a different run ({details}); resume with "
                              f"the same model, data and settings, or start afresh in another folder")


def tensor_digest(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> str:
    """SHA-256 over tensors' names (for dicts), shapes, dtypes and bytes: a fingerprint of weights or data."""
    digest = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, value in items:
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def split_state(prefix: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state (a state_dict, an optimizer state) -> (flat tensors under ``prefix``, plain rest)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, prefix)


def join_state(tensors: dict[str, torch.Tensor], plain: Any) -> Any:
    """Inverse of :func:`split_state` (dict keys keep their types, e.g. optimizer state's integer keys)."""
    if isinstance(plain, dict) and "__tensor__" in plain:
        return tensors[plain["__tensor__"]]
    if isinstance(plain, dict) and "__dict__" in plain:
        return {k: join_state(tensors, v) for k, v in plain["__dict__"]}
    if isinstance(plain, list):
        return [join_state(tensors, v) for v in plain]
    return plain
