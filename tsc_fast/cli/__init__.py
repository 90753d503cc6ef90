"""The ``tsc-fast`` command line: ``demo`` (cli/demo.py), ``purify`` (cli/purify.py) and ``bench`` (cli/bench.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .bench import add_bench_commands
from .demo import add_demo_command
from .purify import add_purify_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsc-fast", description="Backdoor purification with TSC.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_command(commands)
    add_purify_command(commands)
    add_bench_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:  # our error classes (CheckpointError, SettingError, ...)
        print(f"tsc-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
