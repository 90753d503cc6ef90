"""``tsc-fast bench``: the testbed's suite, ablations, merge and scaling study (the one command that reaches into
the testbed)."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

import torch

from ..testbed.ablate import AblationConfig, run_ablation
from ..testbed.scaling import add_scaling_parser
from ..testbed.suite import SuiteConfig, merge_suite_runs, quick_defense_configs, run_suite
from ..tsc import TSCConfig
from .options import add_tsc_options, tsc_overrides


def _write_command(args: argparse.Namespace) -> None:
    """The exact command line next to the results it made."""
    (args.out / "command.txt").write_text("tsc-fast " + " ".join(shlex.quote(a) for a in args.argv) + "\n")


def _cmd_bench_suite(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    given = dict(attacks=args.attacks, rates=args.rates,
                 seeds=tuple(range(args.seed, args.seed + args.seeds)) if args.seeds is not None else None)
    settings = dict(data=args.data, defenses=args.defenses, landscape=not args.no_landscape,
                    **{k: v for k, v in given.items() if v is not None})
    if args.clean_fraction is not None:
        settings["clean_fraction"] = args.clean_fraction
    if args.victim_epochs is not None:
        settings["victim_epochs"] = args.victim_epochs
    config = SuiteConfig.quick(**settings) if args.quick else SuiteConfig(**settings)
    overrides = tsc_overrides(args)
    if overrides:
        base = config.defense_config("tsc") if args.quick else TSCConfig(progress=False, warn_below_steps=0)
        config.defense_configs = {**(quick_defense_configs() if args.quick else {}),
                                  **config.defense_configs, "tsc": dataclasses.replace(base, **overrides)}
    result = run_suite(config, args.out, log=print)
    _write_command(args)
    print(Path(result.files["markdown"]).read_text())
    print("written: " + ", ".join(result.files.values()))
    return 0


def _cmd_bench_ablate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(rate=args.rate, sweeps=args.sweeps, seeds=tuple(range(args.seed, args.seed + (args.seeds or 1))))
    if args.attack is not None:
        settings["attack"] = args.attack
    if args.clean_fraction is not None:
        settings["clean_fraction"] = args.clean_fraction
    if args.victim_epochs is not None:
        settings["victim_epochs"] = args.victim_epochs
    config = AblationConfig.quick_config(**settings) if args.quick else AblationConfig(**settings)
    config.base = {**config.base, **tsc_overrides(args)}
    _, files = run_ablation(config, args.out, log=print)
    _write_command(args)
    print(Path(files["markdown"]).read_text())
    print("written: " + ", ".join(files.values()))
    return 0


def _cmd_bench_merge(args: argparse.Namespace) -> int:
    result = merge_suite_runs(args.folders, args.out)
    commands = [(Path(f) / "command.txt").read_text().strip() for f in args.folders if (Path(f) / "command.txt").is_file()]
    (args.out / "command.txt").write_text("\n".join(commands + ["tsc-fast " + " ".join(args.argv)]) + "\n")
    print(Path(result.files["markdown"]).read_text())
    return 0


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    add_tsc_options(parser, "TSC settings (defaults: TSCConfig(); with --quick: 1 round, 60 steps)", official=False)
    parser.add_argument("--clean-fraction", type=float, help="defender's clean share of the training set "
                        "(default 0.05; 0.1 with --quick, 0.05 on MNIST)")
    parser.add_argument("--victim-epochs", type=int, help="victim training epochs (default 40; 15 with --quick; "
                        "bench suite --data mnist: 20, 5 with --quick)")
    parser.add_argument("--seeds", type=int, help="number of seeds: seed, seed+1, ... (suite default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny CI budgets")
    parser.add_argument("--out", type=Path, required=True, help="output folder (table, CSV, plots, JSON)")


def add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmark suite and ablations on the digits")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    suite = kinds.add_parser("suite", help="victims x defenses: table, CSV, landscape and ACC/ASR plots")
    suite.add_argument("--data", default="digits", choices=("digits", "mnist"),
                       help="dataset: digits (8x8, DigitsCNN, 40 victim epochs; --quick 15) or mnist (28x28, "
                       "MnistCNN, 20 victim epochs; --quick 5)")
    suite.add_argument("--attacks", help="comma list or 'all' (default badnets,blended); adaptive_badnets, "
                       "adaptive_blended: the adaptive attack")
    suite.add_argument("--defenses", default="tsc,ft,mcr,fst", help="comma list or 'all'")
    suite.add_argument("--rates", help="comma list of poisoning rates (default 0.1,0.01; --quick 0.1)")
    suite.add_argument("--no-landscape", action="store_true", help="skip the landscape curves")
    _add_bench_options(suite)
    suite.set_defaults(run=_cmd_bench_suite)
    ablate = kinds.add_parser("ablate", help="TSC sweeps: t*, rounds, clean fraction, steps, batch, augmentation, "
                              "objective")
    ablate.add_argument("--attack", help="victim's attack (default blended; badnets with --quick)")
    ablate.add_argument("--rate", type=float, default=0.1)
    ablate.add_argument("--sweeps", default="all", help="comma list or 'all'")
    _add_bench_options(ablate)
    ablate.set_defaults(run=_cmd_bench_ablate)
    merge = kinds.add_parser("merge", help="one suite report from several suite runs (e.g. one process per rate)")
    merge.add_argument("folders", nargs="+", type=Path, help="output folders of `tsc-fast bench suite` runs")
    merge.add_argument("--out", type=Path, required=True, help="folder of the merged report")
    merge.set_defaults(run=_cmd_bench_merge)
    add_scaling_parser(kinds)
