"""A purify run's output folder: what it holds, when a new run may use it, and the arguments it was started with.

A run folder holds ``purified.safetensors``, ``report.json``, ``report.png``, ``run.json`` (the command's
arguments, so ``--resume`` can continue it), ``checkpoints/`` and, for a BackdoorBench record,
``defense_result.pt``. A new run refuses a folder that holds anything unless told ``--overwrite`` (then the
outputs above are removed first, and nothing else is touched); an input may never be one of the outputs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from .run_report import REPORT_JSON, REPORT_PNG, write_json_atomically

RUN_FILE = "run.json"
PURIFIED_FILE = "purified.safetensors"
CHECKPOINTS = "checkpoints"
DEFENSE_RESULT = "defense_result.pt"
OUTPUTS = (PURIFIED_FILE, REPORT_JSON, REPORT_PNG, RUN_FILE, CHECKPOINTS, DEFENSE_RESULT)
RUN_FILE_FORMAT = 2


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (the message says why and what to do)."""


def check_output_folder(out: str | Path, inputs: Iterable[str | Path | None], overwrite: bool = False) -> Path:
    """Refuse an output folder a new run must not write into; returns it resolved. Writes nothing.

    ``inputs``: the files the run reads; none may be one of the run's outputs (``--model D/purified.safetensors
    --out D`` would replace the model it is purifying), with or without ``overwrite``.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is an existing file; give a folder for the run's outputs")
    outputs = {(out / name).resolve() for name in OUTPUTS}
    for path in inputs:
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in outputs or any(resolved.is_relative_to(o) for o in outputs if o.name == CHECKPOINTS):
            raise RunFolderError(f"the input {path} is one of the outputs a run writes into {out}; choose another "
                                 "--out (the input is never overwritten)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"--out {out} is not empty (it holds {', '.join(sorted(p.name for p in out.iterdir())[:5])}"
                             "); choose a new folder, continue an interrupted run there with --resume, or replace "
                             "its outputs with --overwrite")
    parent = out if out.exists() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write into {parent} (for --out {out}): no permission")
    return out


def clear_outputs(out: str | Path) -> None:
    """Remove an earlier run's outputs from ``out`` (only the names a run writes; other files stay)."""
    out = Path(out)
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_writable_file(path: str | Path | None, what: str) -> None:
    """An output file that can be written (checked before a long run, not after it)."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunFolderError(f"{what} {path} is a folder; give a file name")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path} cannot be written (no writable folder above it)")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunFolderError(f"{what} {path} exists and is not writable")


def save_run_arguments(out: str | Path, argv: list[str], cwd: str | Path) -> Path:
    """``out/run.json``: the run's canonical arguments (paths resolved) and the folder it was started from."""
    return write_json_atomically(Path(out) / RUN_FILE, {"format": RUN_FILE_FORMAT, "argv": list(argv),
                                                        "cwd": str(Path(cwd).resolve())})


def find_run_folder(folder: str | Path) -> Path:
    """The run folder given to ``--resume``: the folder itself, or the one above its ``checkpoints/``."""
    folder = Path(folder).expanduser().resolve()
    for candidate in (folder, folder.parent):
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no {RUN_FILE} in {folder}: --resume takes the output folder of a tsc-fast purify run")


def load_run_arguments(folder: str | Path) -> tuple[list[str], Path, Path]:
    """``(argv, cwd, run folder)`` of the run whose output folder (or its checkpoints/) is ``folder``."""
    run_folder = find_run_folder(folder)
    path = run_folder / RUN_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} cannot be read ({error}); the run folder is damaged") from None
    argv = stored.get("argv") if isinstance(stored, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise RunFolderError(f"{path} is damaged: it should hold the run's arguments as a list of strings")
    cwd = stored.get("cwd", str(run_folder))
    if not isinstance(cwd, str):
        raise RunFolderError(f"{path} is damaged: 'cwd' should be a folder name")
    return argv, Path(cwd), run_folder
