"""Ablations of TSC on the digits: one setting swept at a time around a base configuration.

    rows, files = run_ablation(AblationConfig(attack="blended", sweeps=("t_stage2", "rounds")), out_dir="abl")

Sweeps (``SWEEPS``): stage-1 and stage-2 t* separately, rounds E, the defender's clean fraction, curve optimiser
steps, batch size, augmentation on/off, and the assignment objective (Pearson correlation vs the uncentred second
moment). Every value of every sweep purifies the SAME victim (cached per seed) with the same clean subset, except
the clean-fraction sweep, which by definition changes the subset.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..run_report import write_json_atomically
from ..tsc import TSCConfig, purify
from . import reports
from .suite import make_victim, parse_names


@dataclass(frozen=True)
class Sweep:
    """A swept setting: its values (full and quick) and how a value changes (TSC config, clean fraction)."""

    values: tuple[Any, ...]
    quick_values: tuple[Any, ...]
    apply: Callable[[dict[str, Any], Any], None]   # mutates {"config": {...TSCConfig overrides}, "fraction": f}
    description: str


def _set_config(field_name: str, convert: Callable[[Any], Any] = lambda v: v):
    def apply(settings: dict[str, Any], value: Any) -> None:
        settings["config"][field_name] = convert(value)
    return apply


def _set_augmentation(settings: dict[str, Any], value: Any) -> None:
    """"on": the default shift, rotation and rescaling; "off": none of them."""
    on = value == "on"
    settings["config"].update(augment_shift=None if on else 0, augment_rotation=None if on else 0.0,
                              augment_scale=None if on else 0.0)


def _set_fraction(settings: dict[str, Any], value: Any) -> None:
    settings["fraction"] = float(value)


T_VALUES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

SWEEPS: dict[str, Sweep] = {
    "t_stage1": Sweep(T_VALUES, (0.2, 0.4, 0.6), _set_config("t_stage1"), "t* of the stage-1 curve"),
    "t_stage2": Sweep(T_VALUES, (0.2, 0.4, 0.6), _set_config("t_stage2"), "t* of the stage-2 curve"),
    "rounds": Sweep((1, 2, 3, 4, 5), (1, 2), _set_config("rounds"), "rounds E"),
    "clean_fraction": Sweep((0.01, 0.05, 0.1), (0.05, 0.1), _set_fraction, "defender's clean share of train set"),
    "curve_steps": Sweep((250, 500, 1000, 2000), (20, 60), _set_config("curve_steps"), "optimiser steps per curve"),
    "batch_size": Sweep((8, 16, 32, 64), (16, 64), _set_config("batch_size"), "curve / fine-tune batch size"),
    "augmentation": Sweep(("on", "off"), ("on", "off"), _set_augmentation,
                          "random shift, rotation and rescaling of curve batches (on: the defaults)"),
    "objective": Sweep(("correlation", "second_moment"), ("correlation", "second_moment"), _set_config("objective"),
                       "assignment objective: Pearson correlation or uncentred second moment"),
}


def parse_sweeps(text: str | Sequence[str]) -> tuple[str, ...]:
    return parse_names(text, list(SWEEPS), "sweep", lower=False)


@dataclass
class AblationConfig:
    """The victim (attack, rate, seeds), the sweeps, and the base TSC settings every sweep varies one field of."""

    attack: str = "blended"
    rate: float = 0.1
    seeds: tuple[int, ...] = (0,)
    sweeps: tuple[str, ...] = tuple(SWEEPS)
    clean_fraction: float = 0.05
    victim_epochs: int = 40
    base: dict[str, Any] = field(default_factory=dict)   # TSCConfig overrides shared by every run
    quick: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        self.sweeps = parse_sweeps(self.sweeps)
        unknown = sorted(set(self.base) - {f.name for f in dataclasses.fields(TSCConfig)})
        if unknown:
            raise ValueError(f"unknown TSC settings in base: {unknown}")
        if not self.seeds:
            raise ValueError("need at least one seed")

    @classmethod
    def quick_config(cls, **overrides: Any) -> "AblationConfig":
        """CI budget: 1 seed, short victim, one-round TSC with short curves, two or three values per sweep."""
        settings: dict[str, Any] = dict(attack="badnets", victim_epochs=15, clean_fraction=0.1, quick=True,
                                        base={"rounds": 1, "curve_steps": 60})
        settings.update(overrides)
        return cls(**settings)

    def values(self, sweep: str) -> tuple[Any, ...]:
        return SWEEPS[sweep].quick_values if self.quick else SWEEPS[sweep].values


def run_ablation(config: AblationConfig, out_dir: str | Path | None = None,
                 log: Callable[[str], None] = lambda _: None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Purify the victim once per (sweep, value, seed); rows of ACC/ASR/RA; reports written to ``out_dir``."""
    rows: list[dict[str, Any]] = []
    baselines = []
    for seed in config.seeds:
        setup = make_victim(config.attack, config.rate, seed, epochs=config.victim_epochs)
        baselines.append(setup.before)
        log(f"victim {config.attack} rate {config.rate} seed {seed}: ACC {setup.before['acc']:.1f} "
            f"ASR {setup.before['asr']:.1f}")
        for sweep in config.sweeps:
            for value in config.values(sweep):
                settings: dict[str, Any] = {"config": {"progress": False, "warn_below_steps": 0, "seed": seed,
                                                       **config.base},
                                            "fraction": config.clean_fraction}
                SWEEPS[sweep].apply(settings, value)
                clean = setup.clean_subset(settings["fraction"], seed=seed)
                started = time.perf_counter()
                purified = purify(setup.model, clean, config=TSCConfig(**settings["config"])).model
                seconds = time.perf_counter() - started
                metrics = setup.evaluate(purified)
                rows.append({"sweep": sweep, "value": value, "seed": seed, **metrics, "seconds": round(seconds, 3),
                             "clean_examples": len(clean)})
                log(f"  {sweep}={value}: ACC {metrics['acc']:.1f} ASR {metrics['asr']:.1f} ({seconds:.1f} s)")
    baseline = {m: sum(b[m] for b in baselines) / len(baselines) for m in ("acc", "asr", "ra")}
    files = write_ablation_reports(rows, baseline, config, Path(out_dir)) if out_dir is not None else {}
    return rows, files


def write_ablation_reports(rows: list[dict[str, Any]], baseline: dict[str, float], config: AblationConfig,
                           out_dir: Path) -> dict[str, str]:
    """ablation.md, ablation.csv, ablation.json and one PNG per sweep (``ablation_<sweep>.png``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"csv": reports.write_csv(rows, out_dir / "ablation.csv")}
    header = (f"# TSC ablations on digits\n\nvictim: {config.attack}, rate {config.rate:g}, seeds "
              f"{', '.join(map(str, config.seeds))}; clean fraction {config.clean_fraction:g} unless swept; base "
              f"TSC settings {config.base or 'defaults'}\n\n")
    files["markdown"] = out_dir / "ablation.md"
    files["markdown"].write_text(header + reports.ablation_markdown(rows, baseline))
    if config.plots:
        for sweep in config.sweeps:
            files[f"plot_{sweep}"] = reports.plot_sweep([r for r in rows if r["sweep"] == sweep], sweep,
                                                        out_dir / f"ablation_{sweep}.png", baseline)
    files["json"] = out_dir / "ablation.json"
    write_json_atomically(files["json"], {"config": dataclasses.asdict(config), "baseline": baseline, "rows": rows})
    return {k: str(v) for k, v in files.items()}
