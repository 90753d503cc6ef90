"""The accuracy / backdoor trade-off of TSC settings: ASR against ACC drop, per dataset, attack and seed.

    python bench/bench_tradeoff.py run --data digits --attacks all --seeds 0 --variants default,t2_0.5 \\
        --out bench/results/tradeoff/digits_a.jsonl          # one process; run several side by side
    python bench/bench_tradeoff.py report bench/results/tradeoff --suite bench/results/suite_digits \\
        --suite bench/results/suite_mnist                     # table.md, tradeoff.csv, one figure per dataset

Every (dataset, attack, rate, seed) victim is trained once per process and purified with each variant (a named
set of ``TSCConfig`` overrides, below) on the same clean subset (5% of the clean training set, the run's seed).
One JSON line per run: the backdoored and the purified ACC/ASR/RA, the chosen t*, the wall time. ``report`` merges
every ``*.jsonl`` of a folder: means over seeds, a targets column, and ``asr_vs_acc_drop_<dataset>.png``.
The seconds depend on what else runs on the machine; ACC/ASR/RA do not.
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
from pathlib import Path
from typing import Any

import torch

from tsc_fast import TSCConfig, purify
from tsc_fast.testbed import reports, suite

# Every variant below changes the settings TSC had before the current defaults (PREVIOUS: the paper's t* 0.4, no
# rotation or rescaling), so its recorded rows stay reproducible; "default" is TSCConfig() as it is now.
PREVIOUS: dict[str, Any] = {"t_stage2": 0.4, "augment_rotation": 0.0, "augment_scale": 0.0}
_CHANGES: dict[str, dict[str, Any]] = {
    "previous_default": {},
    "t2_0.5": {"t_stage2": 0.5},
    "t2_0.6": {"t_stage2": 0.6},
    "holdout": {"t_select": "holdout"},
    "avg0.2": {"average_span": 0.2},
    "sam0.05": {"sam_rho": 0.05},
    "distill20": {"distill_epochs": 20},
    "distill50": {"distill_epochs": 50},
    "batch8": {"batch_size": 8},
    "shift2": {"augment_shift": 2},
    "affine": {"augment_rotation": 15.0, "augment_scale": 0.1},
    "affine_b8": {"augment_rotation": 15.0, "augment_scale": 0.1, "batch_size": 8},
    "affine_b8_avg": {"augment_rotation": 15.0, "augment_scale": 0.1, "batch_size": 8, "average_span": 0.2},
    "affine_t2_0.3": {"augment_rotation": 15.0, "augment_scale": 0.1, "t_stage2": 0.3},
    "affine_t2_0.2": {"augment_rotation": 15.0, "augment_scale": 0.1, "t_stage2": 0.2},
    "affine_r2": {"augment_rotation": 15.0, "augment_scale": 0.1, "rounds": 2},
    "affine_avg": {"augment_rotation": 15.0, "augment_scale": 0.1, "average_span": 0.2},
    "affine_distill20": {"augment_rotation": 15.0, "augment_scale": 0.1, "distill_epochs": 20},
    "affine_t2_0.1": {"augment_rotation": 15.0, "augment_scale": 0.1, "t_stage2": 0.1},
    "affine_t2_0.2_avg": {"augment_rotation": 15.0, "augment_scale": 0.1, "t_stage2": 0.2, "average_span": 0.2},
    "affine25_t2_0.2": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage2": 0.2},
    "affine25_t2_0.1": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage2": 0.1},
    "affine25_t2_0.15": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage2": 0.15},
    "affine25_t2_0.15_avg": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage2": 0.15, "average_span": 0.2},
    "affine35_t2_0.1": {"augment_rotation": 35.0, "augment_scale": 0.2, "t_stage2": 0.1},
    "affine35_t2_0.15": {"augment_rotation": 35.0, "augment_scale": 0.2, "t_stage2": 0.15},
    "affine25_t2_0.15_r4": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage2": 0.15, "rounds": 4},
    "affine25_t1_0.5_t2_0.15": {"augment_rotation": 25.0, "augment_scale": 0.15, "t_stage1": 0.5, "t_stage2": 0.15},
}
VARIANTS: dict[str, dict[str, Any]] = {"default": {}, **{name: {**PREVIOUS, **change} for name, change in _CHANGES.items()}}


def parse_list(text: str, known: list[str] | None = None) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown {unknown}; known: {', '.join(known)}")
    return names


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    attacks = sorted(suite.ATTACKS) if args.attacks == "all" else parse_list(args.attacks)
    variants = parse_list(args.variants, list(VARIANTS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in parse_list(args.seeds)):
        for attack in attacks:
            setup = suite.make_victim(attack, args.rate, seed, data=args.data)
            clean = setup.clean_subset(args.clean_fraction, seed=seed)
            for name in variants:
                config = TSCConfig(seed=seed, progress=False, warn_below_steps=0, **VARIANTS[name])
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = purify(setup.model, clean, config=config)
                after = setup.evaluate(result.model)
                row = {"data": args.data, "attack": attack, "rate": args.rate, "seed": seed, "variant": name,
                       "clean_examples": len(clean), "before": setup.before, "after": after,
                       "t": [h["t"] for h in result.history], "seconds": time.perf_counter() - started,
                       "command": "python bench/bench_tradeoff.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
                with open(out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{args.data} {attack} seed {seed} {name}: ACC {setup.before['acc']:.1f} -> {after['acc']:.1f}"
                      f", ASR {setup.before['asr']:.1f} -> {after['asr']:.1f} ({row['seconds']:.0f} s)", flush=True)


def read_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["rate"], r["attack"], r["variant"]), []).append(r)
    summary = []
    for (data, rate, attack, variant), runs in sorted(groups.items()):
        drops = [r["before"]["acc"] - r["after"]["acc"] for r in runs]
        summary.append({
            "data": data, "rate": rate, "attack": attack, "variant": variant, "seeds": len(runs),
            "before_acc": statistics.mean(r["before"]["acc"] for r in runs),
            "before_asr": statistics.mean(r["before"]["asr"] for r in runs),
            "acc": statistics.mean(r["after"]["acc"] for r in runs),
            "asr": statistics.mean(r["after"]["asr"] for r in runs),
            "asr_sd": statistics.stdev([r["after"]["asr"] for r in runs]) if len(runs) > 1 else 0.0,
            "drop": statistics.mean(drops), "drop_sd": statistics.stdev(drops) if len(drops) > 1 else 0.0,
            "implanted": statistics.mean(r["before"]["asr"] for r in runs) >= suite.IMPLANT_THRESHOLD,
            "seconds": statistics.mean(r["seconds"] for r in runs)})
    return summary


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [("ASR and ACC drop after TSC, mean ± sd over seeds (backdoored ASR in brackets); ✓: within the "
              "dataset's target (digits ASR <= 15 and drop <= 2, MNIST ASR <= 5 and drop <= 1)."), ""]
    for data in sorted({e["data"] for e in summary}):
        entries = [e for e in summary if e["data"] == data]
        variants = list(dict.fromkeys(e["variant"] for e in entries))
        asr_max, drop_max = reports.TARGETS[data]
        lines += [f"### {data}", "", "| rate | attack | " + " | ".join(variants) + " |",
                  "|---|---|" + "---|" * len(variants)]
        for rate, attack in sorted({(e["rate"], e["attack"]) for e in entries}):
            cells = []
            first = next(e for e in entries if e["attack"] == attack and e["rate"] == rate)
            for v in variants:
                e = next((x for x in entries if x["attack"] == attack and x["rate"] == rate and x["variant"] == v),
                         None)
                if e is None:
                    cells.append("")
                    continue
                ok = " ✓" if e["asr"] <= asr_max and e["drop"] <= drop_max else ""
                cells.append(f"{e['asr']:.1f} / {e['drop']:.1f}{ok} (n={e['seeds']})")
            mark = "" if first["implanted"] else " (not implanted)"
            lines.append(f"| {rate:g} | {attack}{mark} [{first['before_asr']:.0f}] | " + " | ".join(cells) + " |")
        cleared = {v: sum(1 for e in entries if e["variant"] == v and e["implanted"] and e["asr"] <= asr_max
                          and e["drop"] <= drop_max) for v in variants}
        implanted = {v: sum(1 for e in entries if e["variant"] == v and e["implanted"]) for v in variants}
        lines += ["", "cases within the target: " + ", ".join(f"{v} {cleared[v]}/{implanted[v]}" for v in variants),
                  ""]
    return "\n".join(lines)


def suite_points(folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """The dataset of a ``tsc-fast bench suite`` output folder and its defenses' means over the implanted cases
    (a case: attack x rate, means over seeds; ACC drop against that case's backdoored model)."""
    data = json.loads((folder / "suite.json").read_text())["config"]["data"]
    points = reports.asr_drop_points(reports.read_csv(folder / "runs.csv"))
    means = []
    for defense in dict.fromkeys(p["defense"] for p in points):
        mine = [p for p in points if p["defense"] == defense]
        means.append({"label": f"suite {defense}", "asr": statistics.mean(p["asr"] for p in mine),
                      "drop": statistics.mean(p["acc_drop"] for p in mine), "cases": len(mine)})
    return data, means


def plot(summary: list[dict[str, Any]], folder: Path, suites: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Per dataset: every TSC setting tried as one point (means over its implanted cases), the suite's defenses
    (3 seeds, every implanted case) as stars; the target corner dotted."""
    from tsc_fast.figures import pyplot, save_figure

    plt, written = pyplot(), []
    for data in sorted({e["data"] for e in summary} | set(suites)):
        entries = [e for e in summary if e["data"] == data and e["implanted"]]
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for variant in dict.fromkeys(e["variant"] for e in entries):
            mine = [e for e in entries if e["variant"] == variant]
            x, y = statistics.mean(e["drop"] for e in mine), statistics.mean(e["asr"] for e in mine)
            ax.scatter([x], [y], s=22, color="C0" if variant != "default" else "C3")
            ax.annotate(f"{variant} ({len(mine)})", (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        for point in suites.get(data, []):
            ax.scatter([point["drop"]], [point["asr"]], s=90, marker="*", color="C2")
            ax.annotate(f"{point['label']} ({point['cases']})", (point["drop"], point["asr"]), fontsize=7,
                        xytext=(4, -8), textcoords="offset points", color="C2")
        asr_max, drop_max = reports.TARGETS[data]
        ax.axhline(asr_max, color="grey", linestyle=":")
        ax.axvline(drop_max, color="grey", linestyle=":")
        ax.set_xlabel("ACC drop (points)")
        ax.set_ylabel("ASR after purification (%)")
        ax.set_title(f"{data}: each TSC setting tried (dots: seed 0, mean over the attacks measured, count in "
                     f"brackets)\nand each suite defense (stars: 3 seeds); target: lower left of the dotted lines",
                     fontsize=8)
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, folder / f"asr_vs_acc_drop_{data}.png"))
    return written


def report(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    summary = summarise(read_rows(folder))
    suites = dict(suite_points(Path(f)) for f in args.suite)
    (folder / "table.md").write_text("# TSC settings: ASR / ACC drop\n\n" + markdown(summary))
    with open(folder / "tradeoff.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    print(markdown(summary))
    print("written:", folder / "table.md", folder / "tradeoff.csv", *plot(summary, folder, suites))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run")
    go.add_argument("--data", default="digits")
    go.add_argument("--attacks", default="all")
    go.add_argument("--rate", type=float, default=0.1)
    go.add_argument("--seeds", default="0")
    go.add_argument("--variants", default="default")
    go.add_argument("--clean-fraction", type=float, default=0.05)
    go.add_argument("--threads", type=int, default=1)
    go.add_argument("--out", required=True)
    go.set_defaults(fn=run)
    rep = commands.add_parser("report")
    rep.add_argument("folder")
    rep.add_argument("--suite", action="append", default=[], help="a `tsc-fast bench suite` output folder whose "
                     "defenses join the figure of its dataset (repeatable)")
    rep.set_defaults(fn=report)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
