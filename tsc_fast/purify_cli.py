"""``tsc-fast purify``: load a checkpoint safely, purify it on a dataset's clean subset, save and report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import distributed
from .backdoor.attacks import build_attack
from .backdoor.data import clean_subset, load_dataset
from .backdoor.metrics import accuracy, evaluate, predict
from .backdoor.train import build_classifier
from .demo import format_table
from .io import load_into, save_model
from .tsc import TSCConfig, purify

def purify_checkpoint(model_path: str | Path, arch: str, data: str, out_dir: str | Path, attack: str | None = None,
                      target: int = 0, clean_fraction: float = 0.05, seed: int = 0,
                      config: TSCConfig | None = None, checkpoint_dir: str | Path | None = None,
                      resume: bool = False, checkpoint_interval_s: float = 300.0) -> dict[str, Any]:
    """Purify the checkpoint at ``model_path`` (architecture ``arch``) and save it to ``out_dir``.

    ``checkpoint_dir``/``resume``/``checkpoint_interval_s``: see :func:`tsc_fast.tsc.purify`. Under
    torch.distributed only rank 0 writes the purified model.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {model_path}")
    splits = load_dataset(data)
    model = build_classifier(arch, splits.image_shape, splits.num_classes, seed=seed)
    load_into(model, model_path)
    x_test, y_test = splits.test_tensors()
    trigger = build_attack(attack, splits.image_shape, target=target) if attack else None
    before = _metrics(model, x_test, y_test, trigger)
    clean = clean_subset(splits.train, clean_fraction, seed=seed)
    started = time.perf_counter()
    result = purify(model, clean, config=config or TSCConfig(seed=seed), checkpoint_dir=checkpoint_dir,
                    resume=resume, checkpoint_interval_s=checkpoint_interval_s)
    after = _metrics(result.model, x_test, y_test, trigger)
    out = Path(out_dir) / "purified.safetensors"
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(result.model, out)
    text = (format_table(before, after) if trigger else f"ACC before {before['acc']:.1f}  after {after['acc']:.1f}")
    return {"before": before, "after": after, "seconds": time.perf_counter() - started, "model_path": str(out),
            "clean_examples": len(clean), "history": result.history, "resumed_from": result.resumed_from,
            "text": f"{text}\npurified model: {out}"}


RUN_FILE = "run.json"
PATH_FLAGS = ("--model", "--out", "--json")


def save_run_arguments(out_dir: str | Path, argv: list[str]) -> Path:
    """Record a purify command's arguments in OUT/run.json, so ``--resume OUT`` can continue it."""
    path = Path(out_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = list(argv[1:] if argv and argv[0] == "purify" else argv)
    for i, flag in enumerate(argv[:-1]):  # absolute paths: the run may be resumed from another folder
        if flag in PATH_FLAGS:
            argv[i + 1] = str(Path(argv[i + 1]).resolve())
    path.write_text(json.dumps({"argv": argv}, indent=1))
    return path


def load_run_arguments(folder: str | Path) -> list[str]:
    """The arguments of the run whose output folder (or its checkpoints/ folder) is ``folder``."""
    folder = Path(folder)
    for candidate in (folder / RUN_FILE, folder.parent / RUN_FILE):
        if candidate.is_file():
            return list(json.loads(candidate.read_text())["argv"])
    raise FileNotFoundError(f"no {RUN_FILE} in {folder}: --resume takes the output folder of a tsc-fast purify run")

def _metrics(model, x_test, y_test, trigger) -> dict[str, float]:
    if trigger is None:
        return {"acc": accuracy(predict(model, x_test), y_test)}
    return evaluate(model, x_test, y_test, trigger)
