"""``tsc-fast purify``: load a checkpoint safely, purify it on a dataset's clean subset, save and report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .backdoor.attacks import build_attack
from .backdoor.data import clean_subset, load_dataset
from .backdoor.metrics import accuracy, evaluate, predict
from .backdoor.train import build_classifier
from .demo import format_table
from .io import load_into, save_model
from .tsc import TSCConfig, purify

def purify_checkpoint(model_path: str | Path, arch: str, data: str, out_dir: str | Path, attack: str | None = None,
                      target: int = 0, clean_fraction: float = 0.05, seed: int = 0,
                      config: TSCConfig | None = None) -> dict[str, Any]:
    """Purify the checkpoint at ``model_path`` (architecture ``arch``) and save it to ``out_dir``."""
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
    result = purify(model, clean, config=config or TSCConfig(seed=seed))
    after = _metrics(result.model, x_test, y_test, trigger)
    out = Path(out_dir) / "purified.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(result.model, out)
    text = (format_table(before, after) if trigger else f"ACC before {before['acc']:.1f}  after {after['acc']:.1f}")
    return {"before": before, "after": after, "seconds": time.perf_counter() - started, "model_path": str(out),
            "clean_examples": len(clean), "history": result.history, "text": f"{text}\npurified model: {out}"}

def _metrics(model, x_test, y_test, trigger) -> dict[str, float]:
    if trigger is None:
        return {"acc": accuracy(predict(model, x_test), y_test)}
    return evaluate(model, x_test, y_test, trigger)
