"""Reports of the benchmark suite and the ablations: markdown tables, CSV files and PNG plots (matplotlib, Agg).

Pure functions of the rows a run produced (lists of dicts), so a table or plot can be rebuilt from a saved CSV.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..figures import plot_landscape, pyplot, save_figure
from ..run_report import write_json_atomically

METRICS = ("acc", "asr", "ra")
IMPLANT_THRESHOLD = 50.0    # backdoored ASR (percent) below which an attack "did not implant"
# the accuracy-keeping targets per dataset: (ASR at most, ACC drop at most), means over seeds
TARGETS = {"digits": (15.0, 2.0), "mnist": (5.0, 1.0)}
FOOLS_CLEAN_ASR = 20.0      # clean-model ASR (percent) from which a trigger "fools a clean model": no backdoor


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
        entry["implanted"] = all(_true(m.get("implanted", True)) for m in members)
        clean = [float(m["clean_asr"]) for m in members if m.get("clean_asr") not in (None, "")]
        if clean:
            entry["clean_asr"], entry["clean_asr_sd"] = mean_and_spread(clean)
            entry["clean_asr_max"] = max(clean)
        summary.append(entry)
    return summary


def _true(value: Any) -> bool:
    """A flag as written in rows or read back from a CSV (``True``/``"True"``/``"true"``/``1``)."""
    return str(value) in ("True", "true", "1")


def _victim_note(entry: dict[str, Any]) -> str:
    """`` (not implanted)`` or `` (fools a clean model)`` for a backdoored-model summary that is not judged."""
    if entry["implanted"]:
        return ""
    if entry.get("clean_asr_max", 0.0) >= FOOLS_CLEAN_ASR:
        return " (fools a clean model)"
    return " (not implanted)"


def _cell(entry: dict[str, Any], metric: str) -> str:
    return f"{entry[metric]:.1f} ± {entry[metric + '_sd']:.1f}"


def suite_markdown(rows: Sequence[dict[str, Any]], defenses: Sequence[str], dataset: str | None = None) -> str:
    """One table per poisoning rate: a row per attack; the clean-model ASR of its trigger (when the rows carry
    ``clean_asr``), the backdoored model's and each defense's ACC / ASR / RA (mean ± sd over seeds), then each
    defense's mean wall time and optimiser steps. ``dataset`` names the data in the first line."""
    summary = {(e["attack"], e["rate"], e["defense"]): e for e in summarise(rows)}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    columns = ["none", *defenses]
    with_clean = any(r.get("clean_asr") not in (None, "") for r in rows)
    lines = [("" if dataset is None else f"Dataset: {dataset}. ")
             + "ACC / ASR / RA in percent, mean ± sd over seeds; ASR over triggered non-target test images.",
             f"`none` is the backdoored model; `(not implanted)` marks attacks whose backdoored ASR < "
             f"{IMPLANT_THRESHOLD:g}% for some seed"
             + ("; `clean ASR`: the trigger on a model trained on clean data only (same recipe and seed), "
                f"`(fools a clean model)` where it reaches {FOOLS_CLEAN_ASR:g}% for some seed (the trigger alone "
                "does it: no backdoor, and a defense's ASR cannot go below it)." if with_clean else ".")]
    for rate in rates:
        head = "| attack | " + ("clean ASR | " if with_clean else "")
        lines += ["", f"### poisoning rate {rate:g}", "",
                  head + " | ".join(f"{c} ACC | {c} ASR | {c} RA" for c in columns) + " |",
                  "|---|" + "---|" * (3 * len(columns) + with_clean)]
        for attack in attacks:
            base = summary.get((attack, rate, "none"))
            if base is None:
                continue
            name = attack + _victim_note(base)
            cells = [_cell(base, "clean_asr") if "clean_asr" in base else "-"] if with_clean else []
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
            verdict = ", ".join(winners) or "none" if base["implanted"] else f"({_victim_note(base)[2:-1]}: not judged)"
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


def plot_defense_bars(rows: Sequence[dict[str, Any]], path: str | Path, dataset: str | None = None) -> Path:
    """ACC and ASR per defense (bars: mean over attacks, rates and seeds of implanted victims; whiskers: sd)."""
    plt = pyplot()
    used = [r for r in rows if _true(r.get("implanted", True))] or list(rows)
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
    ax.set_title("ACC and ASR per defense (implanted victims)" + (f", {dataset}" if dataset else ""), fontsize=10)
    return save_figure(fig, path)


def plot_attack_bars(rows: Sequence[dict[str, Any]], metric: str, path: str | Path,
                     dataset: str | None = None) -> Path:
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
    if dataset:
        ax.set_title(f"{metric.upper()} per attack and defense, {dataset}", fontsize=10)
    return save_figure(fig, path)


def asr_drop_points(rows: Sequence[dict[str, Any]], baseline_rows: Sequence[dict[str, Any]] = (),
                    implanted_only: bool = True) -> list[dict[str, Any]]:
    """One point per (attack, rate, defense) of a defense (not ``none``): mean ASR over seeds and the ACC drop,
    the backdoored model's mean ACC minus the defense's (both means over the seeds of that attack and rate).

    The backdoored model's rows (``defense == "none"``) come from ``rows`` or else ``baseline_rows``; points
    without a backdoored row are left out, and so are victims not implanted when ``implanted_only``. Returns
    ``{"attack", "rate", "defense", "asr", "acc", "acc_drop", "runs"}`` dicts.
    """
    own = {(e["attack"], e["rate"]): e for e in summarise([r for r in rows if r["defense"] == "none"])}
    other = {(e["attack"], e["rate"]): e for e in summarise([r for r in baseline_rows if r["defense"] == "none"])}
    points = []
    for entry in summarise([r for r in rows if r["defense"] != "none"]):
        base = own.get((entry["attack"], entry["rate"])) or other.get((entry["attack"], entry["rate"]))
        if base is None or (implanted_only and not (base["implanted"] and entry["implanted"])):
            continue
        points.append({"attack": entry["attack"], "rate": entry["rate"], "defense": entry["defense"],
                       "asr": entry["asr"], "acc": entry["acc"], "acc_drop": base["acc"] - entry["acc"],
                       "runs": entry["runs"]})
    return points


def plot_asr_vs_drop(rows: Sequence[dict[str, Any]], path: str | Path,
                     extra: Mapping[str, Sequence[dict[str, Any]]] | None = None, dataset: str | None = None,
                     labels: bool = True, asr_max: float = 15.0, drop_max: float = 3.0,
                     implanted_only: bool = True) -> Path:
    """ASR against ACC drop: one point per defense x attack (x rate), means over seeds (``asr_drop_points``),
    a colour per defense, a marker per poisoning rate, each point labelled with its attack (``labels``); the
    target corner (ASR <= ``asr_max``, drop <= ``drop_max``) shaded.

    ``extra``: more labelled series, ``{label: rows}``, e.g. every TSC setting tried, one suite run's rows (or
    just its ``tsc`` rows) per label; each series gets its own colour (its defenses are told apart by the label
    ``"label defense"`` when it holds several). Rows of a series without backdoored (``none``) rows are measured
    against the backdoored rows of ``rows``. Rows may be read back from ``runs.csv`` (``read_csv``).
    """
    plt = pyplot()
    own = asr_drop_points(rows, implanted_only=implanted_only)
    series = [(defense, [p for p in own if p["defense"] == defense])
              for defense in dict.fromkeys(p["defense"] for p in own)]
    for name, extra_rows in (extra or {}).items():
        points = asr_drop_points(extra_rows, rows, implanted_only=implanted_only)
        several = len({p["defense"] for p in points}) > 1
        for defense in dict.fromkeys(p["defense"] for p in points):
            series.append((f"{name} {defense}" if several else str(name),
                           [p for p in points if p["defense"] == defense]))
    rates = list(dict.fromkeys(p["rate"] for _, pts in series for p in pts))
    markers = "os^DvP*Xh<>"
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, (label, points) in enumerate(series):
        colour = colours[i % len(colours)]
        for j, rate in enumerate(rates):
            mine = [p for p in points if p["rate"] == rate]
            if not mine:
                continue
            ax.scatter([p["acc_drop"] for p in mine], [p["asr"] for p in mine], color=colour,
                       marker=markers[j % len(markers)], s=36, alpha=0.85,
                       label=label if len(rates) == 1 else f"{label}, rate {rate:g}")
            if labels:
                for p in mine:
                    ax.annotate(p["attack"], (p["acc_drop"], p["asr"]), fontsize=6, xytext=(3, 2),
                                textcoords="offset points", color=colour)
    left = min([0.0] + [p["acc_drop"] for _, pts in series for p in pts]) - 1
    ax.fill_between([left, drop_max], -2, asr_max, color="tab:green", alpha=0.1,
                    label=f"ASR <= {asr_max:g}, drop <= {drop_max:g}")
    ax.set_xlabel("ACC drop (points: backdoored ACC - defended ACC)")
    ax.set_ylabel("ASR after the defense (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    ax.set_title("ASR against ACC drop, means over seeds" + (f", {dataset}" if dataset else ""), fontsize=10)
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
    table = suite_markdown(result.rows, config.defenses, dataset=config.data)
    header = (f"# tsc_fast benchmark suite ({config.data})\n\nattacks {', '.join(config.attacks)}; rates "
              f"{', '.join(f'{r:g}' for r in config.rates)}; seeds {', '.join(map(str, config.seeds))}; clean "
              f"fraction {config.clean_fraction:g}; victim epochs {config.victim_epochs}; total "
              f"{result.seconds:.0f} s\n\n")
    files["markdown"] = out_dir / "table.md"
    asr_max, drop_max = TARGETS[config.data]   # every suite dataset has its bar
    files["markdown"].write_text(header + table + "\n" + targets_markdown(result.rows, config.defenses, asr_max,
                                                                         drop_max))
    if config.plots:
        files["defense_bars"] = plot_defense_bars(result.rows, out_dir / "defenses_acc_asr.png", config.data)
        files["asr_by_attack"] = plot_attack_bars(result.rows, "asr", out_dir / "asr_by_attack.png", config.data)
        files["acc_by_attack"] = plot_attack_bars(result.rows, "acc", out_dir / "acc_by_attack.png", config.data)
        files["asr_vs_acc_drop"] = plot_asr_vs_drop(result.rows, out_dir / "asr_vs_acc_drop.png",
                                                    dataset=config.data, asr_max=asr_max, drop_max=drop_max)
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
