"""The TSC settings every command takes, written once: flags, their overrides, and the TSCConfig they make."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..run_report import write_json_atomically
from ..tsc import DEFAULT_ROTATION, DEFAULT_SCALE, TSCConfig

_DEFAULTS = TSCConfig()
TSC_FLAGS = (("rounds", "--rounds", int, f"rounds E (default {_DEFAULTS.rounds})"),
             ("curve_steps", "--curve-steps", int, f"optimiser steps per curve (default {_DEFAULTS.curve_steps})"),
             ("t_stage1", "--t-stage1", float, f"t* of the stage-1 curve (default {_DEFAULTS.t_stage1})"),
             ("t_stage2", "--t-stage2", float, f"t* of the stage-2 curve (default {_DEFAULTS.t_stage2}; --official: 0.4)"),
             ("augment_rotation", "--augment-rotation", float,
              f"random rotation of curve batches, degrees (default {DEFAULT_ROTATION:g}; --official: 0)"),
             ("augment_scale", "--augment-scale", float,
              f"random rescaling of curve batches, +- fraction (default {DEFAULT_SCALE:g}; --official: 0)"))


def add_tsc_options(parser: argparse.ArgumentParser, title: str = "TSC settings", official: bool = True) -> None:
    """``--rounds``, ``--curve-steps``, ``--t-stage1``, ``--t-stage2`` (and ``--official``) in one group."""
    group = parser.add_argument_group(title)
    if official:
        group.add_argument("--official", action="store_true", help="the official code's settings exactly")
    for _, flag, kind, help_text in TSC_FLAGS:
        group.add_argument(flag, type=kind, help=help_text)


def tsc_overrides(args: argparse.Namespace) -> dict:
    """The TSC settings given on the command line (the others keep their defaults)."""
    return {name: getattr(args, name) for name, *_ in TSC_FLAGS if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace, dataset: str | None = None) -> TSCConfig:
    """TSCConfig from the TSC flags; ``--official`` takes the official settings for ``dataset`` (its flips)."""
    overrides = tsc_overrides(args)
    overrides.update(seed=args.seed, progress=not args.no_progress)
    if args.official:
        return TSCConfig.official(dataset=dataset or getattr(args, "data", None), **overrides)
    return TSCConfig(**overrides)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options demo and purify share besides the TSC settings."""
    parser.add_argument("--clean-fraction", type=float, help="share of the training set the defender holds as "
                        "clean data (default 0.05; purify: all of a user's folder or .npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        write_json_atomically(path, report)
