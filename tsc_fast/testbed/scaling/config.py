"""What the scaling study sweeps and measures: the families, the components and :class:`ScalingConfig`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES = ("mlp", "cnn", "vit")
SWEEP_NAMES = {"mlp": "hidden", "cnn": "multiplier", "vit": "mlp_ratio"}   # each family's width knob
COMPONENTS = ("stats", "lap_ours", "lap_scipy", "permute", "curve_step", "bn_recal", "round", "round_lap")
Row = dict[str, Any]   # one CSV row: a component measured (or skipped) at one sweep point


@dataclass
class ScalingConfig:
    """What the sweep runs. ``ScalingConfig()`` is the full study; ``ScalingConfig.quick_config()`` a seconds-long
    one."""

    families: tuple[str, ...] = FAMILIES
    mlp_widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    mlp_in: int = 64
    cnn_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16)
    cnn_base_width: int = 32
    cnn_image: int = 8
    vit_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    vit_hidden: int = 64
    vit_heads: int = 4
    vit_layers: int = 2
    vit_image: int = 32
    vit_patch: int = 8
    samples: int = 512                 # clean examples: the statistics pass, BN recalibration and the round's data
    batch_size: int = 128              # statistics batches and curve batches (TSC's stats_batch_size is 128)
    round_curve_steps: int = 4         # optimiser steps per curve inside the timed whole round
    official_curve_steps: int = 2000   # the paper's steps per curve, for the extrapolated round
    repeats: int = 5                   # timed runs per component and width (at most) ...
    budget_s: float = 20.0             # ... fewer when they would take longer than this
    max_width: int | None = None       # drop sweep points whose largest group exceeds this
    scipy_max_width: int | None = 8192  # scipy's LAP only up to this largest group (it is cubic-ish)
    curve_max_width: int | None = None  # curve step and BN recalibration only up to this largest group
    round_max_width: int | None = None  # the whole round only up to this largest group
    memory_fraction: float = 0.8       # skip a component whose estimated peak exceeds this share of free memory
    threads: int | None = None         # torch threads and our solver's threads (None: library defaults)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "ScalingConfig":
        """Tiny widths, one repeat, one thread: the whole sweep in seconds (tests, CI). One thread also keeps
        tiny workloads from stalling in torch's thread pool on a busy machine."""
        settings: dict[str, Any] = dict(
            mlp_widths=(32, 64, 128), cnn_multipliers=(1, 2, 4), cnn_base_width=4, vit_ratios=(1, 2, 4),
            vit_hidden=16, vit_heads=2, samples=64, batch_size=32, round_curve_steps=2, repeats=1, budget_s=2.0,
            threads=1, quick=True)
        settings.update(overrides)
        return cls(**settings)
