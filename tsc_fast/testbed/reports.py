"""Reports of the benchmark suite and the ablations: markdown tables, CSV files and PNG plots (matplotlib, Agg).

Pure functions of the rows a run produced (lists of dicts), so a table or plot can be rebuilt from a saved CSV.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..figures import plot_landscape, pyplot, save_figure
from ..run_report import write_json_atomically

METRICS = ("acc", "asr", "ra")


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: Iterable[dict[str, Any]], keys: Sequence[str] = ("attack", "rate", "defense")
              ) -> list[dict[str, Any]]:
    """Group rows by ``keys``; per group: mean and spread of ACC/ASR/RA, mean seconds and steps, count."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    summary = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, key))
        for metric in METRICS:
            entry[metric], entry[f"{metric}_sd"] = mean_and_spread([m[metric] for m in members])
        entry["seconds"] = statistics.fmean(float(m["seconds"]) for m in members)
        entry["steps"] = statistics.fmean(float(m.get("steps", 0)) for m in members)
        entry["runs"] = len(members)
        entry["implanted"] = all(str(m.get("implanted", True)) in ("True", "true", "1") for m in members)
        summary.append(entry)
    return summary


def _cell(entry: dict[str, Any], metric: str) -> str:
    return f"{entry[metric]:.1f} ± {entry[metric + '_sd']:.1f}"


def suite_markdown(rows: Sequence[dict[str, Any]], defenses: Sequence[str]) -> str:
    """One table per poisoning rate: a row per attack; the backdoored model's and each defense's ACC / ASR / RA
    (mean ± sd over seeds), then each defense's mean wall time and optimiser steps."""
    summary = {(e["attack"], e["rate"], e["defense"]): e for e in summarise(rows)}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    columns = ["none", *defenses]
    lines = ["ACC / ASR / RA in percent, mean ± sd over seeds; ASR over triggered non-target test images.",
             "`none` is the backdoored model; `(not implanted)` marks attacks whose backdoored ASR < 50%."]
    for rate in rates:
        lines += ["", f"### poisoning rate {rate:g}", "",
                  "| attack | " + " | ".join(f"{c} ACC | {c} ASR | {c} RA" for c in columns) + " |",
                  "|---|" + "---|" * (3 * len(columns))]
        for attack in attacks:
            base = summary.get((attack, rate, "none"))
            if base is None:
                continue
            name = attack + ("" if base["implanted"] else " (not implanted)")
            cells = []
            for column in columns:
                entry = summary.get((attack, rate, column))
                cells += [_cell(entry, m) if entry else "-" for m in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| attack | " + " | ".join(f"{d} seconds | {d} steps" for d in columns) + " |",
                  "|---|" + "---|" * (2 * len(columns))]
        for attack in attacks:
            cells = []
            for column in columns:
                entry = summary.get((attack, rate, column))
                cells += [f"{entry['seconds']:.1f}", f"{entry['steps']:.0f}"] if entry else ["-", "-"]
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_markdown(rows: Sequence[dict[str, Any]], defenses: Sequence[str], asr_max: float = 15.0,
                     drop_max: float = 3.0) -> str:
    """Per rate and attack: each defense's mean ASR and ACC drop against the bar (ASR <= ``asr_max``, drop <=
    ``drop_max`` points), and the defenses that clear it. Attacks that did not implant are listed but not judged."""
    summary = {(e["attack"], e["rate"], e["defense"]): e for e in summarise(rows)}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    lines = [f"### Targets: ASR <= {asr_max:g}% with an ACC drop <= {drop_max:g} points (means over seeds)", "",
             "| rate | attack | backdoored ASR | " + " | ".join(f"{d} ASR / drop" for d in defenses)
             + " | clear the bar |", "|---|---|---|" + "---|" * (len(defenses) + 1)]
    met_counts = dict.fromkeys(defenses, 0)
    judged = 0
    for rate in rates:
        for attack in attacks:
            base = summary.get((attack, rate, "none"))
            if base is None:
                continue
            cells, winners = [], []
            for name in defenses:
                entry = summary.get((attack, rate, name))
                if entry is None:
                    cells.append("-")
                    continue
                drop = base["acc"] - entry["acc"]
                ok = entry["asr"] <= asr_max and drop <= drop_max
                cells.append(f"{entry['asr']:.1f} / {drop:.1f}" + (" ✓" if ok and base["implanted"] else ""))
                if ok and base["implanted"]:
                    winners.append(name)
                    met_counts[name] += 1
            judged += base["implanted"]
            verdict = ", ".join(winners) or "none" if base["implanted"] else "(not implanted: not judged)"
            lines.append(f"| {rate:g} | {attack} | {base['asr']:.1f} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Cases cleared (of " + str(judged) + " implanted): "
              + ", ".join(f"{d} {met_counts[d]}" for d in defenses)]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Rows as CSV with the union of their keys as header, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by ``write_csv``, numbers converted back."""
    def convert(value: str) -> Any:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with Path(path).open(newline="") as handle:
        return [{k: convert(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# ---------------------------------------------------------------------------------------------------------------
# plots


def plot_defense_bars(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ACC and ASR per defense (bars: mean over attacks, rates and seeds of implanted victims; whiskers: sd)."""
    plt = pyplot()
    used = [r for r in rows if str(r.get("implanted", True)) in ("True", "true", "1")] or list(rows)
    summary = summarise(used, keys=("defense",))
    names = [e["defense"] for e in summary]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8))
    width = 0.38
    xs = range(len(names))
    for offset, metric, colour in ((-width / 2, "acc", "tab:blue"), (width / 2, "asr", "tab:red")):
        ax.bar([x + offset for x in xs], [e[metric] for e in summary], width,
               yerr=[e[metric + "_sd"] for e in summary], capsize=3, color=colour, label=metric.upper())
    ax.set_xticks(list(xs), [n if n != "none" else "backdoored" for n in names])
    ax.set_ylim(0, 105)
    ax.set_ylabel("percent")
    ax.legend()
    ax.set_title("ACC and ASR per defense (implanted victims)", fontsize=10)
    return save_figure(fig, path)


def plot_attack_bars(rows: Sequence[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """One group of bars per attack, one bar per defense, for ``metric`` (mean over rates and seeds)."""
    plt = pyplot()
    summary = summarise(rows, keys=("attack", "defense"))
    attacks = list(dict.fromkeys(e["attack"] for e in summary))
    defenses = list(dict.fromkeys(e["defense"] for e in summary))
    lookup = {(e["attack"], e["defense"]): e for e in summary}
    fig, ax = plt.subplots(figsize=(1.3 * len(attacks) * max(1, len(defenses)) / 3 + 3, 3.8))
    width = 0.8 / max(1, len(defenses))
    for i, defense in enumerate(defenses):
        xs = [a + (i - (len(defenses) - 1) / 2) * width for a in range(len(attacks))]
        values = [lookup[(a, defense)][metric] if (a, defense) in lookup else 0.0 for a in attacks]
        ax.bar(xs, values, width, label=defense if defense != "none" else "backdoored")
    ax.set_xticks(list(range(len(attacks))), attacks, rotation=20)
    ax.set_ylim(0, 120)  # headroom for the legend above the 100% bars
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.legend(fontsize=8, ncol=min(5, len(defenses)), loc="upper center")
    return save_figure(fig, path)


def plot_sweep(rows: Sequence[dict[str, Any]], sweep: str, path: str | Path,
               baseline: dict[str, float] | None = None) -> Path:
    """ACC and ASR against the swept value (rows: ``{"value", "acc", "asr", ...}`` of one sweep)."""
    plt = pyplot()
    summary = summarise(rows, keys=("value",))
    labels = [str(e["value"]) for e in summary]
    numeric = all(isinstance(e["value"], (int, float)) and not isinstance(e["value"], bool) for e in summary)
    xs = [float(e["value"]) for e in summary] if numeric else list(range(len(summary)))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for metric, colour in (("acc", "tab:blue"), ("asr", "tab:red")):
        ax.errorbar(xs, [e[metric] for e in summary], yerr=[e[metric + "_sd"] for e in summary], marker="o",
                    capsize=3, color=colour, label=metric.upper() + " after TSC")
        if baseline:
            ax.axhline(baseline[metric], color=colour, linestyle=":", alpha=0.7,
                       label=metric.upper() + " backdoored")
    if not numeric:
        ax.set_xticks(xs, labels)
    ax.set_xlabel(sweep)
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"ablation: {sweep}", fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# whole reports


def write_suite_reports(result, out_dir: Path) -> dict[str, str]:
    """table.md, runs.csv, suite.json and (when ``result.config.plots``) the PNG plots; returns name -> path."""

    out_dir.mkdir(parents=True, exist_ok=True)
    config = result.config
    files = {"csv": write_csv(result.rows, out_dir / "runs.csv")}
    table = suite_markdown(result.rows, config.defenses)
    header = (f"# tsc_fast benchmark suite ({config.data})\n\nattacks {', '.join(config.attacks)}; rates "
              f"{', '.join(f'{r:g}' for r in config.rates)}; seeds {', '.join(map(str, config.seeds))}; clean "
              f"fraction {config.clean_fraction:g}; victim epochs {config.victim_epochs}; total "
              f"{result.seconds:.0f} s\n\n")
    files["markdown"] = out_dir / "table.md"
    files["markdown"].write_text(header + table + "\n" + targets_markdown(result.rows, config.defenses))
    if config.plots:
        files["defense_bars"] = plot_defense_bars(result.rows, out_dir / "defenses_acc_asr.png")
        files["asr_by_attack"] = plot_attack_bars(result.rows, "asr", out_dir / "asr_by_attack.png")
        files["acc_by_attack"] = plot_attack_bars(result.rows, "acc", out_dir / "acc_by_attack.png")
        if result.landscape is not None:
            files["landscape"] = plot_landscape(result.landscape, out_dir / "landscape.png")
    files["json"] = out_dir / "suite.json"
    write_json_atomically(files["json"], {"config": config.to_dict(), "rows": result.rows, "landscape": result.landscape,
                              "seconds": result.seconds})
    return {k: str(v) for k, v in files.items()}


def ablation_markdown(rows: Sequence[dict[str, Any]], baseline: dict[str, float]) -> str:
    """One section per sweep: value, ACC / ASR / RA (mean ± sd over seeds) and seconds."""
    lines = [f"Backdoored model: ACC {baseline['acc']:.1f}, ASR {baseline['asr']:.1f}, RA {baseline['ra']:.1f}."]
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        lines += ["", f"### {sweep}", "", "| value | ACC | ASR | RA | seconds |", "|---|---|---|---|---|"]
        for entry in summarise([r for r in rows if r["sweep"] == sweep], keys=("value",)):
            lines.append(f"| {entry['value']} | {_cell(entry, 'acc')} | {_cell(entry, 'asr')} | "
                         f"{_cell(entry, 'ra')} | {entry['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
