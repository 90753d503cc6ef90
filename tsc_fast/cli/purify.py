"""``tsc-fast purify``: a user's checkpoint and data (or a BackdoorBench record) in, a purified model and a report out.

Work is split in two: ``prepare_*`` reads and checks every input (architecture, checkpoint, data, trigger) and
writes nothing; :func:`run_job` purifies, evaluates and writes the outputs. A bad input therefore fails before the
output folder is touched.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .. import distributed
from ..architectures import build_architecture, describe_architecture
from ..data import DatasetSplits, clean_subset, load_dataset
from ..data.backdoorbench import NORMALIZATION, import_backdoorbench
from ..data.backdoorbench_defense import (
    DEFAULT_RATIO,
    attack_test_split,
    bare_network,
    default_defense_dir,
    evaluate_backdoorbench,
    load_defender_data,
    save_defense_result,
)
from ..metrics import accuracy, evaluate, loss_metrics, predict
from ..model_io import load_into, save_model
from ..normalization import NormalizedModel
from ..run_folder import (
    PURIFIED_FILE,
    check_output_folder,
    check_writable_file,
    clear_outputs,
    load_run_arguments,
    save_run_arguments,
)
from ..run_report import LandscapeRecorder
from ..testbed.attacks import Attack, PatchTrigger, build_attack, triggered_test_set
from ..tsc import TSCConfig, purify
from .demo import format_table
from .options import add_run_options, add_tsc_options, config_from_args, write_json

BENCHMARK_DATA = ("digits", "mnist", "cifar10", "gtsrb")  # training sets of which the defender holds a share
DEFAULT_CLEAN_FRACTION = 0.05                             # of those; of a user's own folder or .npz: all of it
LANDSCAPE_EXAMPLES = 512                                  # test images evaluated at every landscape point
Metrics = dict[str, float]


@dataclass
class PurifyJob:
    """Everything a purification needs, read and checked.

    ``model`` is what TSC purifies (the network, behind an input normalisation when there is one); ``unwrap``
    turns a purified ``model`` back into the bare network whose weights are saved. ``evaluate`` gives metrics in
    percent on the test data (None without test data); ``profile`` the losses a landscape point records.
    """

    model: nn.Module
    clean: Dataset
    evaluate: Callable[[nn.Module], Metrics] | None
    profile: Callable[[nn.Module], Metrics] | None
    info: dict[str, Any]
    unwrap: Callable[[nn.Module], nn.Module]
    extra_outputs: list[Callable[[nn.Module, Path], Path]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def parse_normalization(text: str | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--normalize``: a dataset name (``cifar10``, ``imagenet``, ...), ``MEAN,STD`` (one value each, for every
    channel) or ``m1,..,mC,s1,..,sC``; None for no normalisation."""
    if text is None:
        return None
    key = text.strip().lower()
    if key in NORMALIZATION:
        preset = NORMALIZATION[key]
        if preset is None:
            return None
        mean, std = preset
    else:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--normalize {text!r}: expected MEAN,STD, {2 * channels} comma-separated numbers "
                             f"(the means, then the stds), or one of {', '.join(sorted(NORMALIZATION))}") from None
        if len(values) == 2:
            mean, std = (values[0],) * channels, (values[1],) * channels
        elif len(values) == 2 * channels:
            mean, std = tuple(values[:channels]), tuple(values[channels:])
        else:
            raise ValueError(f"--normalize {text!r}: {len(values)} numbers for {channels}-channel images; give "
                             f"MEAN,STD or {2 * channels} numbers (the means, then the stds)")
    if len(mean) != channels:
        raise ValueError(f"--normalize {text!r} is for {len(mean)}-channel images, the data have {channels}")
    if any(not s > 0 for s in std):
        raise ValueError(f"--normalize {text!r}: every std must be positive")
    return tuple(mean), tuple(std)


def _trigger(attack: str | None, trigger_png: str | Path | None, mask_png: str | Path | None, target: int,
             image_shape: Sequence[int], num_classes: int) -> Attack | None:
    if not 0 <= target < num_classes:
        raise ValueError(f"--target {target} is not a class of this data (0..{num_classes - 1})")
    if (trigger_png is None) != (mask_png is None):
        raise ValueError("--trigger and --mask go together: the pattern PNG and the mask PNG (white = trigger)")
    if trigger_png is not None:
        if attack is not None:
            raise ValueError("give either --attack NAME or --trigger PNG --mask PNG, not both")
        return PatchTrigger.from_png(trigger_png, mask_png, image_shape, target=target)
    return build_attack(attack, image_shape, target=target) if attack else None


def _clean_set(splits: DatasetSplits, fraction: float | None, count: int | None, seed: int) -> tuple[Dataset, str]:
    if fraction is not None and count is not None:
        raise ValueError("give --clean-fraction or --clean-count, not both")
    if count is not None:
        return clean_subset(splits.train, None, seed=seed, count=count), f"{count} examples"
    if fraction is None:
        fraction = DEFAULT_CLEAN_FRACTION if splits.name in BENCHMARK_DATA else 1.0
    return clean_subset(splits.train, fraction, seed=seed), f"{fraction:g} of the training split"


def _metric_functions(test: tuple[torch.Tensor, torch.Tensor] | None, trigger: Attack | None):
    """(evaluate, profile) on the test data: ACC (+ ASR, RA with a trigger); clean/poisoned losses."""
    if test is None:
        return None, None
    x_test, y_test = test

    def evaluate_model(model: nn.Module) -> Metrics:
        if trigger is None:
            return {"acc": accuracy(predict(model, x_test), y_test)}
        return evaluate(model, x_test, y_test, trigger)

    x_few, y_few = x_test[:LANDSCAPE_EXAMPLES], y_test[:LANDSCAPE_EXAMPLES]
    x_triggered = triggered_test_set(x_few, y_few, trigger)[0] if trigger is not None else None

    def profile(model: nn.Module) -> Metrics:
        return loss_metrics(model, x_few, y_few, x_triggered, trigger.target if trigger else None)

    return evaluate_model, profile


def prepare_checkpoint_job(model_path: str | Path, arch: str, data: str, num_classes: int | None = None,
                           image_size: int | None = None, normalize: str | None = None,
                           clean_fraction: float | None = None, clean_count: int | None = None,
                           attack: str | None = None, target: int = 0, trigger_png: str | Path | None = None,
                           mask_png: str | Path | None = None, seed: int = 0) -> PurifyJob:
    """Read and check a checkpoint, its architecture, the data and the trigger (nothing is written)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {model_path}")
    splits = load_dataset(data, seed=seed, **({"image_size": image_size} if image_size is not None else {}))
    classes = num_classes or splits.num_classes
    if num_classes is not None and num_classes < splits.num_classes:
        raise ValueError(f"--num-classes {num_classes}, but the data have labels up to {splits.num_classes - 1}")
    network = build_architecture(arch, classes, image_shape=splits.image_shape, seed=seed)
    load_into(network, model_path)
    network.eval()
    normalization = parse_normalization(normalize, splits.image_shape[0])
    model = NormalizedModel(network, *normalization).eval() if normalization else network
    trigger = _trigger(attack, trigger_png, mask_png, target, splits.image_shape, classes)
    test = splits.test_tensors() if splits.has_test else None
    evaluate_model, profile = _metric_functions(test, trigger)
    clean, clean_rule = _clean_set(splits, clean_fraction, clean_count, seed)
    info = {"title": f"{describe_architecture(arch)} on {splits.name}", "checkpoint": str(model_path.resolve()),
            "architecture": describe_architecture(arch), "num_classes": classes,
            "data": {"source": str(data), "layout": splits.layout, "image_shape": list(splits.image_shape),
                     "train_examples": len(splits.train), "test_examples": len(test[0]) if test else 0},
            "clean": {"examples": len(clean), "rule": clean_rule, "seed": seed},
            "normalization": {"mean": list(normalization[0]), "std": list(normalization[1])} if normalization
            else None,
            "trigger": repr(trigger) if trigger is not None else None}
    return PurifyJob(model, clean, evaluate_model, profile, info, unwrap=bare_network)


def prepare_backdoorbench_job(record_dir: str | Path, data_dir: str | Path | None = None,
                              clean_fraction: float | None = None, clean_count: int | None = None,
                              seed: int = 0) -> PurifyJob:
    """Read a BackdoorBench attack record, its clean data and its defender's subset (nothing is written).

    The clean subset is BackdoorBench's own (``ratio`` 5%, ``random_seed`` 0 by default); metrics follow its
    definitions on the record's poisoned test set. Besides ``purified.safetensors`` the job writes
    ``defense_result.pt`` in BackdoorBench's form (its analysis scripts read it unchanged).
    """

    if clean_count is not None:
        raise ValueError("BackdoorBench's defenses take a share of the training set: use --clean-fraction "
                         f"(default {DEFAULT_RATIO:g}) with --backdoorbench, not --clean-count")
    record = import_backdoorbench(record_dir)
    ratio = DEFAULT_RATIO if clean_fraction is None else clean_fraction
    data = load_defender_data(record, data_root=data_dir, ratio=ratio, seed=seed)

    def evaluate_model(model: nn.Module) -> Metrics:
        return evaluate_backdoorbench(model, data.clean_test, data.bd_test)

    x_few, y_few = data.clean_test[0][:LANDSCAPE_EXAMPLES], data.clean_test[1][:LANDSCAPE_EXAMPLES]
    attacked = attack_test_split(data.bd_test) if data.bd_test is not None else None

    def profile(model: nn.Module) -> Metrics:
        if attacked is None:
            return loss_metrics(model, x_few, y_few)
        return loss_metrics(model, x_few, y_few, attacked.x[:LANDSCAPE_EXAMPLES], attacked.y[:LANDSCAPE_EXAMPLES])

    def write_defense_result(network: nn.Module, out_dir: Path) -> Path:
        return save_defense_result(out_dir, network, record.model_name, record.num_classes, record.image_shape[0])

    info = {"title": f"BackdoorBench {record.model_name} on {record.dataset}", "dataset": record.dataset,
            "default_out": default_defense_dir(record.record_dir),
            "backdoorbench": {"record": str(Path(record_dir).resolve()), "model_name": record.model_name,
                              "num_classes": record.num_classes, "data_folder": str(data.data_folder),
                              "notes": record.notes + data.notes},
            "clean": {"examples": len(data.clean_train[1]), "rule": f"BackdoorBench's ratio {ratio:g}, seed {seed}",
                      "seed": seed},
            "normalization": {"mean": list(record.normalization[0]), "std": list(record.normalization[1])}
            if record.normalization else None}
    clean = torch.utils.data.TensorDataset(*data.clean_train)
    return PurifyJob(record.model, clean, evaluate_model, profile, info, unwrap=bare_network,
                     extra_outputs=[write_defense_result])


# ---------------------------------------------------------------------------------------------------------------
# running


def run_job(job: PurifyJob, out_dir: str | Path, config: TSCConfig | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, checkpoint_interval_s: float = 300.0,
            landscape: bool = False) -> dict[str, Any]:
    """Purify ``job.model``, evaluate before and after, write the purified weights and the report into
    ``out_dir``; returns the report (plus ``text``, a summary for the terminal). Under torch.distributed only
    rank 0 writes."""
    config = config or TSCConfig()
    out_dir = Path(out_dir)
    before = job.evaluate(job.model) if job.evaluate else None
    recorder = None
    if landscape and job.profile is not None:
        recorder = LandscapeRecorder(job.profile, config.rounds, config.t_stage1, config.t_stage2)
    started = time.perf_counter()
    result = purify(job.model, job.clean, config=config, checkpoint_dir=checkpoint_dir, resume=resume,
                    checkpoint_interval_s=checkpoint_interval_s, on_curve=recorder)
    seconds = time.perf_counter() - started
    after = job.evaluate(result.model) if job.evaluate else None
    network = job.unwrap(result.model)
    files: dict[str, str] = {}
    report: dict[str, Any] = {}
    if distributed.is_main():
        files["model"] = str(save_model(network, out_dir / PURIFIED_FILE))
        for write in job.extra_outputs:
            path = write(network, out_dir)
            files[path.stem] = str(path)
        context = {**job.info, "config": config.to_dict(), "purify_seconds": seconds,
                   "landscape": recorder.landscape if recorder else None, "files": files}
        written = result.save_report(out_dir, before, after, **context)
        files.update({f"report_{kind}": str(path) for kind, path in written.items()})
        report = result.report(before, after, **context)
    report["text"] = _summary(before, after, files)
    return report


def _summary(before: Metrics | None, after: Metrics | None, files: dict[str, str]) -> str:
    if before is None or after is None:
        lines = ["no test data: purified without before/after metrics"]
    else:
        lines = [format_table(before, after)]
    labels = {"model": "purified model", "defense_result": "BackdoorBench defense result",
              "report_json": "report", "report_png": "report figure"}
    lines += [f"{labels.get(kind, kind)}: {path}" for kind, path in files.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the command


def add_purify_command(commands) -> None:
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
    add_tsc_options(purify)
    add_run_options(purify)
    purify.set_defaults(run=run_purify_command, command_parser=purify)


def run_purify_command(args: argparse.Namespace) -> int:
    """``tsc-fast purify``: every input read and checked before the output folder is touched."""
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume continues a run in its folder; --overwrite would delete it: choose one")
        args = _resumed_arguments(args)
    elif args.out is not None:
        args.out = check_output_folder(args.out, _input_files(args), args.overwrite)
    check_writable_file(args.json, "--json")
    config = config_from_args(args)  # settings checked before any input is read
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
        config = config_from_args(args, dataset=job.info["dataset"])
    # every input is read and checked: only now is the output folder touched
    distributed.init_from_environment()  # under torchrun: join the process group
    checkpoints = None if args.no_checkpoints else args.out / "checkpoints"
    if args.resume is None and distributed.is_main():
        if args.overwrite:
            clear_outputs(args.out)
        save_run_arguments(args.out, canonical_argv(args), Path.cwd())
    report = run_job(job, args.out, config=config, checkpoint_dir=checkpoints, resume=args.resume is not None,
                     checkpoint_interval_s=args.checkpoint_interval, landscape=args.landscape)
    if distributed.is_main():
        print(report.pop("text"))
        write_json(args.json, report)
    return 0


def _input_files(args: argparse.Namespace) -> list[Path | None]:
    """The files a purify run reads (none may be one of its outputs)."""
    data = Path(args.data) if args.data and Path(args.data).exists() else None
    record = args.backdoorbench / "attack_result.pt" if args.backdoorbench is not None else None
    return [args.model, args.trigger, args.mask, data, record]


# arguments a resumed run takes from its own call, not from run.json
_NOT_STORED = ("help", "resume", "json", "no_progress", "overwrite")


def canonical_argv(args: argparse.Namespace) -> list[str]:
    """The run's arguments as parsed (however they were spelled: --model=x, abbreviations), paths resolved:
    what run.json stores, so a resume from any folder, of a moved folder, reads the same inputs."""
    argv: list[str] = []
    for action in args.command_parser._actions:
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


def _resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The interrupted run's own arguments (from its run.json), in the folder where it now is (it may have moved),
    plus this call's --json and --no-progress."""
    stored, cwd, folder = load_run_arguments(args.resume)
    extra = (["--no-progress"] if args.no_progress else []) + (["--json", str(args.json)] if args.json else [])
    try:
        resumed = args.command_parser.parse_args([*stored, *extra])
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
    resumed.out, resumed.resume, resumed.argv, resumed.command = folder, args.resume, stored, args.command
    return resumed
