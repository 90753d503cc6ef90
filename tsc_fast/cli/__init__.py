"""The ``tsc-fast`` command line: ``demo``, ``purify`` and ``bench`` (``suite``, ``ablate``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..run_report import write_json_atomically

DEFAULT_OUT = "tsc_fast_out"


def _config_from_args(args: argparse.Namespace, dataset: str | None = None):
    """TSCConfig from the TSC flags; ``--official`` takes the official settings for ``dataset`` (its flips)."""
    from ..tsc import TSCConfig

    overrides = _tsc_overrides(args)
    overrides.update(seed=args.seed, progress=not args.no_progress)
    if args.official:
        return TSCConfig.official(dataset=dataset or getattr(args, "data", None), **overrides)
    return TSCConfig(**overrides)


def _add_tsc_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TSC settings")
    group.add_argument("--official", action="store_true", help="the official code's settings exactly")
    group.add_argument("--rounds", type=int, help="rounds E (default 3)")
    group.add_argument("--curve-steps", type=int, help="optimiser steps per curve (default 2000)")
    group.add_argument("--t-stage1", type=float, help="t* of the stage-1 curve (default 0.4)")
    group.add_argument("--t-stage2", type=float, help="t* of the stage-2 curve (default 0.4)")
    parser.add_argument("--clean-fraction", type=float, help="share of the training set the defender holds as "
                        "clean data (default 0.05; purify: all of a user's folder or .npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        write_json_atomically(path, report)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    report = run_demo(attack=args.attack, clean_fraction=args.clean_fraction, seed=args.seed,
                      config=_config_from_args(args), out_dir=args.out, progress=not args.no_progress,
                      landscape=args.landscape)
    print(f"digits, {args.attack} backdoor (target {report['setup']['target']}), "
          f"{report['clean_examples']} clean images for TSC")
    print(format_table(report["before"], report["after"]))
    print(f"purified model: {report.get('model_path')}   total {report['seconds']:.1f} s "
          f"(TSC {report['purify_seconds']:.1f} s)")
    for kind, path in (report.get("files") or {}).items():
        print(f"report ({kind}): {path}")
    _write_json(args.json, report)
    return 0


def _cmd_purify(args: argparse.Namespace) -> int:
    from .. import distributed
    from .purify import prepare_backdoorbench_job, prepare_checkpoint_job, run_job
    from ..run_folder import check_output_folder, check_writable_file, clear_outputs, save_run_arguments

    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume continues a run in its folder; --overwrite would delete it: choose one")
        args = _resumed_arguments(args)
    elif args.out is not None:
        args.out = check_output_folder(args.out, _input_files(args), args.overwrite)
    check_writable_file(args.json, "--json")
    config = _config_from_args(args)  # settings checked before any input is read
    if args.backdoorbench is None:
        missing = [f"--{name}" for name in ("model", "arch", "out") if getattr(args, name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (or --backdoorbench RECORD_DIR, or --resume OUT of an "
                             f"interrupted run)")
        job = prepare_checkpoint_job(
            args.model, args.arch, args.data, num_classes=args.num_classes, image_size=args.image_size,
            normalize=args.normalize, clean_fraction=args.clean_fraction, clean_count=args.clean_count,
            attack=args.attack, target=args.target, trigger_png=args.trigger, mask_png=args.mask, seed=args.seed)
    else:
        job = prepare_backdoorbench_job(args.backdoorbench, data_dir=args.data_dir,
                                        clean_fraction=args.clean_fraction, clean_count=args.clean_count,
                                        seed=args.seed)
        default_out = job.info.pop("default_out")
        if args.out is None:
            args.out = check_output_folder(default_out, _input_files(args), args.overwrite)
        config = _config_from_args(args, dataset=job.info["dataset"])
    # every input is read and checked: only now is the output folder touched
    distributed.init_from_environment()  # under torchrun: join the process group
    checkpoints = None if args.no_checkpoints else args.out / "checkpoints"
    if args.resume is None and distributed.is_main():
        if args.overwrite:
            clear_outputs(args.out)
        save_run_arguments(args.out, _canonical_purify_argv(args), Path.cwd())
    report = run_job(job, args.out, config=config, checkpoint_dir=checkpoints, resume=args.resume is not None,
                     checkpoint_interval_s=args.checkpoint_interval, landscape=args.landscape)
    if distributed.is_main():
        print(report.pop("text"))
        _write_json(args.json, report)
    return 0


def _input_files(args: argparse.Namespace) -> list[Path | None]:
    """The files a purify run reads (none may be one of its outputs)."""
    data = Path(args.data) if args.data and Path(args.data).exists() else None
    record = args.backdoorbench / "attack_result.pt" if args.backdoorbench is not None else None
    return [args.model, args.trigger, args.mask, data, record]


# arguments a resumed run takes from its own call, not from run.json
_NOT_STORED = ("help", "resume", "json", "no_progress", "overwrite")


def _canonical_purify_argv(args: argparse.Namespace) -> list[str]:
    """The run's arguments as parsed (however they were spelled: --model=x, abbreviations), paths resolved:
    what run.json stores, so a resume from any folder, of a moved folder, reads the same inputs."""
    argv: list[str] = []
    for action in _subcommand("purify")._actions:
        if not action.option_strings or action.dest in _NOT_STORED:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, Path) or (action.dest == "data" and Path(value).exists()):
            argv += [flag, str(Path(value).expanduser().resolve())]
        else:
            argv += [flag, str(value)]
    return argv


def _subcommand(name: str) -> argparse.ArgumentParser:
    """The parser of one ``tsc-fast`` sub-command."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The interrupted run's own arguments (from its run.json), in the folder where it now is (it may have moved),
    plus this call's --json and --no-progress."""
    from ..run_folder import load_run_arguments

    stored, cwd, folder = load_run_arguments(args.resume)
    extra = (["--no-progress"] if args.no_progress else []) + (["--json", str(args.json)] if args.json else [])
    try:
        resumed = build_parser().parse_args(["purify", *stored, *extra])
    except SystemExit:
        raise ValueError(f"the arguments stored in {folder / 'run.json'} do not parse; the run folder is "
                         "damaged") from None
    for name in ("model", "arch", "backdoorbench", "out"):
        given, kept = getattr(args, name), getattr(resumed, name)
        if name == "out":
            kept = folder
        if given is None:
            continue
        same = given == kept if name == "arch" else kept is not None and Path(given).resolve() == Path(kept).resolve()
        if not same:
            raise ValueError(f"--{name} {given} differs from the interrupted run's {kept}; --resume continues "
                             f"that run with its own arguments")
    if cwd.is_dir() and str(cwd) not in sys.path:  # a MODULE:CALLABLE architecture is imported from there
        sys.path.insert(0, str(cwd))
    resumed.out, resumed.resume, resumed.argv = folder, args.resume, stored
    return resumed


def _tsc_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("rounds", args.rounds), ("curve_steps", args.curve_steps),
                              ("t_stage1", args.t_stage1), ("t_stage2", args.t_stage2)) if v is not None}


def _write_command(args: argparse.Namespace) -> None:
    """The exact command line next to the results it made."""
    import shlex

    (args.out / "command.txt").write_text("tsc-fast " + " ".join(shlex.quote(a) for a in args.argv) + "\n")


def _cmd_bench_suite(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..testbed.suite import SuiteConfig, quick_defense_configs, run_suite
    from ..tsc import TSCConfig

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
    overrides = _tsc_overrides(args)
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
    import torch

    from ..testbed.ablate import AblationConfig, run_ablation

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
    config.base = {**config.base, **_tsc_overrides(args)}
    _, files = run_ablation(config, args.out, log=print)
    _write_command(args)
    print(Path(files["markdown"]).read_text())
    print("written: " + ", ".join(files.values()))
    return 0


def _cmd_bench_merge(args: argparse.Namespace) -> int:
    from ..testbed.suite import merge_suite_runs

    result = merge_suite_runs(args.folders, args.out)
    commands = [(Path(f) / "command.txt").read_text().strip() for f in args.folders if (Path(f) / "command.txt").is_file()]
    (args.out / "command.txt").write_text("\n".join(commands + ["tsc-fast " + " ".join(args.argv)]) + "\n")
    print(Path(result.files["markdown"]).read_text())
    return 0


def _add_bench_tsc_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TSC settings (defaults: TSCConfig(); with --quick: 1 round, 60 steps)")
    group.add_argument("--rounds", type=int)
    group.add_argument("--curve-steps", type=int)
    group.add_argument("--t-stage1", type=float)
    group.add_argument("--t-stage2", type=float)
    parser.add_argument("--clean-fraction", type=float, help="defender's clean share of the training set "
                        "(default 0.05; 0.1 with --quick)")
    parser.add_argument("--victim-epochs", type=int, help="victim training epochs (default 40; 15 with --quick)")
    parser.add_argument("--seeds", type=int, help="number of seeds: seed, seed+1, ... (suite default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny CI budgets")
    parser.add_argument("--out", type=Path, required=True, help="output folder (table, CSV, plots, JSON)")


def _add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmark suite and ablations on the digits")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    suite = kinds.add_parser("suite", help="victims x defenses: table, CSV, landscape and ACC/ASR plots")
    suite.add_argument("--data", default="digits", help="dataset (digits)")
    suite.add_argument("--attacks", help="comma list or 'all' (default badnets,blended); adaptive_badnets, "
                       "adaptive_blended: the adaptive attack")
    suite.add_argument("--defenses", default="tsc,ft,mcr,fst", help="comma list or 'all'")
    suite.add_argument("--rates", help="comma list of poisoning rates (default 0.1,0.01; --quick 0.1)")
    suite.add_argument("--no-landscape", action="store_true", help="skip the landscape curves")
    _add_bench_tsc_options(suite)
    suite.set_defaults(run=_cmd_bench_suite)
    ablate = kinds.add_parser("ablate", help="TSC sweeps: t*, rounds, clean fraction, steps, batch, augmentation, "
                              "objective")
    ablate.add_argument("--attack", help="victim's attack (default blended; badnets with --quick)")
    ablate.add_argument("--rate", type=float, default=0.1)
    ablate.add_argument("--sweeps", default="all", help="comma list or 'all'")
    _add_bench_tsc_options(ablate)
    ablate.set_defaults(run=_cmd_bench_ablate)
    merge = kinds.add_parser("merge", help="one suite report from several suite runs (e.g. one process per rate)")
    merge.add_argument("folders", nargs="+", type=Path, help="output folders of `tsc-fast bench suite` runs")
    merge.add_argument("--out", type=Path, required=True, help="folder of the merged report")
    merge.set_defaults(run=_cmd_bench_merge)
    from ..testbed.scaling import add_scaling_parser
    add_scaling_parser(kinds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsc-fast", description="Backdoor purification with TSC.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="backdoor a digits CNN, purify it, print ACC/ASR/RA before and after")
    demo.add_argument("--attack", default="badnets", choices=["badnets", "blended"])
    demo.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="where the purified model and "
                      "report.json/report.png are saved")
    demo.add_argument("--landscape", action="store_true", help="also plot the loss landscape along the last "
                      "round's curves")
    _add_tsc_options(demo)
    demo.set_defaults(run=_cmd_demo)

    purify = commands.add_parser("purify", help="purify a checkpoint with clean data, or a BackdoorBench record "
                                 "(resumable)")
    model = purify.add_argument_group("model")
    model.add_argument("--model", type=Path, help="checkpoint (.safetensors, or a torch file loaded with "
                       "weights_only=True; state_dict/model wrappers and module. prefixes handled)")
    model.add_argument("--arch", help="architecture: mlp, cnn, preact_resnet18; torchvision:NAME (resnet18, "
                       "vgg16_bn, vit_b_16, ...); timm:NAME; or MODULE:CALLABLE, your own class or factory "
                       "imported from the working directory or PYTHONPATH (called with num_classes=)")
    model.add_argument("--num-classes", type=int, help="classifier outputs (default: the number of classes in "
                       "the data)")
    model.add_argument("--normalize", metavar="MEAN,STD", help="input normalisation in front of the network "
                       "while purifying (the saved weights stay the bare network's): MEAN,STD, m1,..,mC,s1,..,sC, "
                       "or a dataset name (cifar10, imagenet, ...)")
    data = purify.add_argument_group("data")
    data.add_argument("--data", default="digits", help="digits, mnist, or a path: an image-folder tree "
                      "(train/ [+ test/ or val/] of class folders, or class folders directly), a CIFAR-10 "
                      "python-batches folder, a GTSRB folder, or an .npz with x and y [, x_test, y_test]")
    data.add_argument("--image-size", type=int, help="resize images to N x N")
    data.add_argument("--clean-count", type=int, help="number of clean training examples TSC uses (instead of "
                      "--clean-fraction)")
    data.add_argument("--attack", help="if the trigger is one of the package's attacks (badnets, blended, ...): "
                      "also report ASR and RA on the test data")
    data.add_argument("--trigger", type=Path, metavar="PNG", help="your own patch trigger's pattern (with --mask): "
                      "also report ASR and RA")
    data.add_argument("--mask", type=Path, metavar="PNG", help="where --trigger applies (white: trigger)")
    data.add_argument("--target", type=int, default=0, help="the attack's target class (default 0)")
    bench = purify.add_argument_group("BackdoorBench")
    bench.add_argument("--backdoorbench", type=Path, metavar="RECORD_DIR", help="purify a BackdoorBench attack "
                       "record (its attack_result.pt); writes a BackdoorBench-style defense_result.pt too")
    bench.add_argument("--data-dir", type=Path, metavar="DATA_ROOT", help="where the record's clean dataset lies "
                       "(default: the record's data_path)")
    purify.add_argument("--out", type=Path, help="output folder (purified model, report.json/png, run.json, "
                        "checkpoints/); with --backdoorbench default RECORD_DIR/defense/tsc_fast")
    purify.add_argument("--landscape", action="store_true", help="also record the loss landscape along the last "
                        "round's curves (in the report; needs test data)")
    purify.add_argument("--resume", type=Path, metavar="OUT", help="continue the interrupted run whose output "
                        "folder is OUT, with that run's arguments; the result equals an uninterrupted run's")
    purify.add_argument("--checkpoint-interval", type=float, default=300.0, metavar="SECONDS",
                        help="inside a curve or fine-tune, checkpoint after the epoch in which this much time has "
                        "passed (default 300; a checkpoint follows every stage regardless)")
    purify.add_argument("--no-checkpoints", action="store_true", help="write no checkpoints (cannot resume)")
    purify.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out "
                        "(without it, a non-empty --out is refused)")
    _add_tsc_options(purify)
    purify.set_defaults(run=_cmd_purify)
    _add_bench_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:  # our error classes (CheckpointError, SettingError, ...) are ValueErrors
        print(f"tsc-fast {args.command}: error: {err}", file=sys.stderr)
        return 2

