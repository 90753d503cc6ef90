"""``tsc-fast demo``: backdoor a digits CNN, purify it with TSC, report ACC/ASR/RA before and after."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..metrics import loss_metrics
from ..model_io import save_model
from ..run_report import LandscapeRecorder
from ..testbed.victims import make_backdoored_digits
from ..tsc import TSCConfig, purify
from .options import add_run_options, add_tsc_options, config_from_args, write_json

METRICS = ("acc", "asr", "ra")
DEFAULT_OUT = "tsc_fast_out"
DEMO_CLEAN_FRACTION = 0.05  # the defender's share of the training set in TSC's setting


def run_demo(attack: str = "badnets", clean_fraction: float | None = None, seed: int = 0, rate: float = 0.1,
             config: TSCConfig | None = None, out_dir: str | Path | None = None, progress: bool = True,
             landscape: bool = False) -> dict[str, Any]:
    """Train a backdoored digits CNN, purify it, and return the JSON-able report of ``tsc-fast demo``.

    With ``out_dir``: the purified model (``purified.safetensors``), ``report.json`` and ``report.png`` go there.
    """
    started = time.perf_counter()
    config = config or TSCConfig(progress=progress, seed=seed)
    clean_fraction = DEMO_CLEAN_FRACTION if clean_fraction is None else clean_fraction
    setup = make_backdoored_digits(attack=attack, rate=rate, seed=seed, progress=progress)
    clean = setup.clean_subset(clean_fraction, seed=seed)
    recorder = None
    if landscape:
        x_triggered = setup.attack.apply(setup.x_test[setup.y_test != setup.attack.target])

        def profile(model):
            return loss_metrics(model, setup.x_test, setup.y_test, x_triggered, setup.attack.target)

        recorder = LandscapeRecorder(profile, config.rounds, config.t_stage1, config.t_stage2)
    result = purify(setup.model, clean, config=config, on_curve=recorder)
    after = setup.evaluate(result.model)
    context: dict[str, Any] = {
        "title": f"digits demo: {attack} backdoor, {len(clean)} clean images",
        "purify_seconds": result.seconds,
        "clean_examples": len(clean),
        "setup": setup.config,
        "config": config.to_dict(),
        "landscape": recorder.landscape if recorder else None,
    }
    if out_dir is not None:
        path = save_model(result.model, Path(out_dir) / "purified.safetensors")
        context["model_path"] = str(path)
        context["files"] = {k: str(v) for k, v in result.save_report(out_dir, setup.before, after, **context).items()}
    report = result.report(setup.before, after, **context)
    report.update(before=setup.before, after=after, history=result.history,
                  seconds=time.perf_counter() - started)
    return report


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A before/after table in percent of the metrics both rows have (ACC, and ASR/RA when the trigger is known)."""
    names = [m for m in METRICS if m in before and m in after]
    lines = [f"{'':8}" + "".join(f"{m.upper():>8}" for m in names)]
    for name, row in (("before", before), ("after", after)):
        lines.append(f"{name:8}" + "".join(f"{row[m]:8.1f}" for m in names))
    return "\n".join(lines)


def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="backdoor a digits CNN, purify it, print ACC/ASR/RA before and after")
    demo.add_argument("--attack", default="badnets", choices=["badnets", "blended"])
    demo.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="where the purified model and "
                      "report.json/report.png are saved")
    demo.add_argument("--landscape", action="store_true", help="also plot the loss landscape along the last "
                      "round's curves")
    add_tsc_options(demo)
    add_run_options(demo)
    demo.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """``tsc-fast demo``."""
    report = run_demo(attack=args.attack, clean_fraction=args.clean_fraction, seed=args.seed,
                      config=config_from_args(args), out_dir=args.out, progress=not args.no_progress,
                      landscape=args.landscape)
    print(f"digits, {args.attack} backdoor (target {report['setup']['target']}), "
          f"{report['clean_examples']} clean images for TSC")
    print(format_table(report["before"], report["after"]))
    print(f"purified model: {report.get('model_path')}   total {report['seconds']:.1f} s "
          f"(TSC {report['purify_seconds']:.1f} s)")
    for kind, path in (report.get("files") or {}).items():
        print(f"report ({kind}): {path}")
    write_json(args.json, report)
    return 0
