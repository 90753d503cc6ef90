"""``tsc-fast bench scaling``: the sub-command's flags, the config they make, and the run that writes every
output."""
from __future__ import annotations

import argparse
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from .config import FAMILIES, Row, ScalingConfig
from .report import write_outputs
from .timing import run_sweep


def run_study(config: ScalingConfig, out: Path, command: str, log: Callable[[str], None] = print
              ) -> tuple[list[Row], dict[str, str]]:
    """Set threads, run the sweep, write every output; torch's thread count is restored afterwards."""
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    try:
        rows = run_sweep(config, log)
        files = write_outputs(rows, config, out, command, started, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return rows, files


def parse_int_list(text: str) -> tuple[int, ...]:
    """"1,2, 4" -> (1, 2, 4); empty items are ignored."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_families(text: str) -> tuple[str, ...]:
    """The --families comma list, checked against FAMILIES."""
    families = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    return families


def config_from_args(args: argparse.Namespace) -> ScalingConfig:
    """The ScalingConfig of the flags: flags not given keep the full study's (or --quick's) defaults."""
    settings: dict[str, Any] = dict(families=parse_families(args.families), max_width=args.max_width)
    for name in ("threads", "repeats", "budget_s", "samples", "batch_size", "round_curve_steps", "curve_max_width",
                 "round_max_width", "seed"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.scipy_max_width is not None:
        settings["scipy_max_width"] = args.scipy_max_width or None   # 0: no cap
    for name in ("mlp_widths", "cnn_multipliers", "vit_ratios"):
        if getattr(args, name):
            settings[name] = parse_int_list(getattr(args, name))
    return ScalingConfig.quick_config(**settings) if args.quick else ScalingConfig(**settings)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``args.argv``, set by the CLI's main), for command.txt and the report."""
    argv = getattr(args, "argv", None)
    return "tsc-fast " + " ".join(shlex.quote(a) for a in argv) if argv is not None else "tsc-fast bench scaling"


def run_bench_scaling(args: argparse.Namespace) -> int:
    """The sub-command: run the study, print the report and the files written."""
    _, files = run_study(config_from_args(args), args.out, command_line(args), log=print)
    print(Path(files["markdown"]).read_text())
    print("written: " + ", ".join(files.values()))
    return 0


def add_scaling_parser(kinds: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """``tsc-fast bench scaling``: add the sub-command to the ``bench`` sub-parsers."""
    parser = kinds.add_parser("scaling", help="component costs against layer width: log-log plots, fitted "
                              "exponents, report, CSV")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of mlp,cnn,vit (default all)")
    parser.add_argument("--max-width", type=int, help="skip sweep points whose largest permutation group has more "
                        "units than this")
    parser.add_argument("--repeats", type=int, help="timed runs per component and width, at most (default 5; "
                        "--quick 1); fewer when a run is long")
    parser.add_argument("--budget-s", type=float, help="seconds per component and width that repeats may take "
                        "(default 20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads and our solver's threads (1 recommended "
                        "for stable timings)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, one repeat: seconds in all")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling"),
                        help="output folder (default bench/results/scaling)")
    parser.add_argument("--mlp-widths", help="comma list of MLP hidden widths (default 256,...,16384)")
    parser.add_argument("--cnn-multipliers", help="comma list of CNN width multipliers (default 1,2,4,8,16)")
    parser.add_argument("--vit-ratios", help="comma list of ViT MLP ratios (default 1,2,4,8,16)")
    parser.add_argument("--samples", type=int, help="clean examples (default 512)")
    parser.add_argument("--batch-size", type=int, help="statistics and curve batch (default 128)")
    parser.add_argument("--round-curve-steps", type=int, help="optimiser steps per curve in the timed round "
                        "(default 4)")
    parser.add_argument("--scipy-max-width", type=int, help="largest group up to which scipy's LAP runs "
                        "(default 8192; 0: no cap)")
    parser.add_argument("--curve-max-width", type=int, help="largest group up to which the curve step and BN "
                        "recalibration run (default: no cap but the memory check)")
    parser.add_argument("--round-max-width", type=int, help="largest group up to which the whole round runs "
                        "(default: no cap but the memory check)")
    parser.add_argument("--seed", type=int)
    parser.set_defaults(run=run_bench_scaling)
    return parser
