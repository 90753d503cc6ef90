"""The embedded demo: backdoor a digits CNN, purify it with TSC, report ACC/ASR/RA before and after."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .backdoor.train import make_backdoored_digits
from .io import save_model
from .tsc import TSCConfig, purify

METRICS = ("acc", "asr", "ra")


def run_demo(attack: str = "badnets", clean_fraction: float = 0.05, seed: int = 0, rate: float = 0.1,
             config: TSCConfig | None = None, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a backdoored digits CNN, purify it, and return the JSON-able report of ``tsc-fast demo``."""
    started = time.perf_counter()
    config = config or TSCConfig(progress=progress, seed=seed)
    setup = make_backdoored_digits(attack=attack, rate=rate, seed=seed, progress=progress)
    clean = setup.clean_subset(clean_fraction, seed=seed)
    result = purify(setup.model, clean, config=config)
    report: dict[str, Any] = {
        "before": setup.before,
        "after": setup.evaluate(result.model),
        "seconds": time.perf_counter() - started,
        "purify_seconds": result.seconds,
        "clean_examples": len(clean),
        "setup": setup.config,
        "plan": vars(result.plan) if result.plan else None,
        "config": config.to_dict(),
        "history": result.history,
    }
    if out_dir is not None:
        path = Path(out_dir) / "purified.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(result.model, path)
        report["model_path"] = str(path)
    return report


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A before/after table of ACC, ASR and RA in percent."""
    lines = [f"{'':8}{'ACC':>8}{'ASR':>8}{'RA':>8}"]
    for name, row in (("before", before), ("after", after)):
        lines.append(f"{name:8}" + "".join(f"{row[m]:8.1f}" for m in METRICS))
    return "\n".join(lines)
