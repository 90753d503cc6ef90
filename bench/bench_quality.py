"""Purification quality on digits: ACC/ASR/RA before and after TSC, over attacks, seeds and configurations.

    python bench/bench_quality.py                                   # badnets+blended, seeds 0-2, default+official
    python bench/bench_quality.py --attacks badnets --seeds 0 --configs default --clean-fraction 0.1

Each run trains the victim (docs/calibration.md recipe), draws the defender's clean subset (--clean-fraction of the
clean training set, seed = run seed), purifies, and evaluates on the fixed test split. Per-run rows are appended to
bench/results/quality.csv; a summary (mean and standard deviation over seeds) is written to
bench/results/quality.md and quality.json together with the command line that produced it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from tsc_fast import TSCConfig, purify
from tsc_fast.testbed.victims import make_backdoored_digits

RESULTS = Path(__file__).parent / "results"
CONFIGS = {"default": TSCConfig, "official": TSCConfig.official}


def run_one(attack: str, seed: int, config_name: str, clean_fraction: float, overrides: dict) -> dict:
    setup = make_backdoored_digits(attack=attack, seed=seed, progress=False)
    clean = setup.clean_subset(clean_fraction, seed=seed)
    config = CONFIGS[config_name](seed=seed, progress=False, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = purify(setup.model, clean, config=config)
    after = setup.evaluate(result.model)
    return {"attack": attack, "seed": seed, "config": config_name, "clean_fraction": clean_fraction,
            "clean_examples": len(clean), **{f"before_{k}": v for k, v in setup.before.items()},
            **{f"after_{k}": v for k, v in after.items()}, "tsc_seconds": result.seconds,
            "curve_steps": result.plan.curve_steps, "batch_size": result.plan.batch_size}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["config"], r["clean_fraction"]), []).append(r)
    summary = []
    for (attack, config, fraction), runs in groups.items():
        entry = {"attack": attack, "config": config, "clean_fraction": fraction, "seeds": len(runs)}
        for key in ("before_acc", "before_asr", "after_acc", "after_asr", "after_ra", "tsc_seconds"):
            values = [r[key] for r in runs]
            entry[key] = statistics.mean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["acc_drop"] = entry["before_acc"] - entry["after_acc"]
        entry["paper_bar_met"] = entry["after_asr"] <= 15 and entry["acc_drop"] <= 3
        summary.append(entry)
    return summary


def markdown(summary: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| attack | config | clean | seeds | ACC before | ASR before | ACC after | ASR after | RA after | "
             "ACC drop | TSC s | ASR<=15 & drop<=3 |", "|" + "---|" * 12]
    for s in summary:
        lines.append(
            f"| {s['attack']} | {s['config']} | {s['clean_fraction']:.0%} | {s['seeds']} | "
            f"{s['before_acc']:.1f} | {s['before_asr']:.1f} | {s['after_acc']:.1f} +- {s['after_acc_std']:.1f} | "
            f"{s['after_asr']:.1f} +- {s['after_asr_std']:.1f} | {s['after_ra']:.1f} | {s['acc_drop']:.1f} | "
            f"{s['tsc_seconds']:.0f} | {'yes' if s['paper_bar_met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="badnets,blended")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default="default,official")
    parser.add_argument("--clean-fraction", type=float, default=0.05)
    parser.add_argument("--t-stage2", type=float, help="override stage-2 t* (research option)")
    parser.add_argument("--curve-steps", type=int, help="override the curve budget in optimiser steps")
    parser.add_argument("--batch-size", type=int, help="override the curve/fine-tune batch size")
    parser.add_argument("--tag", default="", help="suffix of the summary files")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chosen = {"t_stage2": args.t_stage2, "curve_steps": args.curve_steps, "batch_size": args.batch_size}
    overrides = {k: v for k, v in chosen.items() if v is not None}
    command = "python bench/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "quality.csv"
    for attack in args.attacks.split(","):
        for config_name in args.configs.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                start = time.perf_counter()
                row = run_one(attack, seed, config_name, args.clean_fraction, overrides)
                row.update(when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           overrides=json.dumps(overrides))
                rows.append(row)
                print(f"{attack:8} {config_name:8} seed {seed}: ACC {row['before_acc']:.1f} -> "
                      f"{row['after_acc']:.1f}  ASR {row['before_asr']:.1f} -> {row['after_asr']:.1f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                new = not csv_path.exists()
                with csv_path.open("a", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
    summary = summarise(rows)
    text = markdown(summary, command)
    print(text)
    suffix = f"_{args.tag}" if args.tag else ""
    (RESULTS / f"quality{suffix}.md").write_text(text)
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps({"command": command, "summary": summary,
                                                               "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
