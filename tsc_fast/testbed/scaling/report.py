"""The scaling study's outputs: ``scaling.csv`` (one row per family, width and component), ``report.md`` (tables,
fitted power-law exponents, where the assignment stops being negligible), one log-log PNG per family and
``command.txt``."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...figures import pyplot, save_figure
from .. import reports
from ..machine import cpu_model
from .config import COMPONENTS, SWEEP_NAMES, Row, ScalingConfig
from .fit import (
    TOP_FIT,
    as_number,
    crossing,
    derived_series,
    exponent_table,
    fit_series,
    lap_shares,
    reference_series,
    series,
)
from .formatting import format_number, format_percent

CSV_FIELDS = ("family", "sweep", "width", "largest_group", "groups", "params", "component", "seconds", "repeats",
              "backend", "threads", "samples", "objective", "note")
THRESHOLDS = (0.05, 0.5)   # the LAP shares the report looks for: 5% and 50%
PLOT_STYLES: dict[str, dict[str, Any]] = {
    "lap_ours": dict(color="C3", lw=2.4, marker="o"), "lap_scipy": dict(color="C3", ls="--", marker="s"),
    "stats": dict(color="C0", marker="o"), "permute": dict(color="C7", marker="v"),
    "curve_step": dict(color="C2", marker="^"), "bn_recal": dict(color="C4", marker="D"),
    "round": dict(color="k", marker="x"), "round_lap": dict(color="C1", ls=":", marker="x")}


# ---------------------------------------------------------------------------------------------- CSV
def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """The rows' ``CSV_FIELDS`` columns, in that order (missing values empty), through ``reports.write_csv``."""
    return reports.write_csv([{k: row.get(k, "") for k in CSV_FIELDS} for row in rows], path)


read_csv = reports.read_csv  # numbers come back as numbers; empty cells as ""


# ---------------------------------------------------------------------------------------------- machine
def machine_description(threads: int | None) -> dict[str, str]:
    """CPU, cores, threads, library versions and load average, for the report's header."""
    # Lazy: scipy is not loaded at CLI start-up (~0.1 s); only its version is wanted, once the sweep is done.
    import scipy

    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "solver_threads": str(threads) if threads else f"{os.cpu_count()} (solve_many default)",
            "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "python": platform.python_version(), "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}


# ---------------------------------------------------------------------------------------------- plots
def plot_seconds(axis: Any, rows: Sequence[Row], family: str) -> None:
    """Log-log seconds per component, the exponent over the largest widths in the legend."""
    for component in COMPONENTS:
        points = series(rows, family, component)
        if not points:
            continue
        k, _ = fit_series(points, TOP_FIT)
        label = f"{component} (k={k:.2f})" if math.isfinite(k) else component
        axis.plot(list(points), list(points.values()), label=label, **PLOT_STYLES.get(component, {}))
    axis.set_yscale("log")
    axis.set_xlabel(SWEEP_NAMES[family])
    axis.set_ylabel("median wall seconds")
    axis.set_title(f"{family}: seconds per component (k: log-log slope, largest {TOP_FIT} widths)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def plot_shares(axis: Any, rows: Sequence[Row], family: str, config: ScalingConfig) -> None:
    """The LAP's share of the statistics pass, a curve epoch and an official-length round; 5% and 50% dotted."""
    shares = lap_shares(rows, family, config)
    for key, label, style in (("ours_stats", "ours / stats pass", dict(color="C3", marker="o")),
                              ("scipy_stats", "scipy / stats pass", dict(color="C3", ls="--", marker="s")),
                              ("ours_epoch", "ours / curve epoch", dict(color="C2", marker="o")),
                              ("scipy_epoch", "scipy / curve epoch", dict(color="C2", ls="--", marker="s")),
                              ("official_share", f"ours / round ({config.official_curve_steps} steps)",
                               dict(color="k", marker="x"))):
        measured = [s for s in shares if math.isfinite(s[key])]
        if measured:
            axis.plot([s["width"] for s in measured], [s[key] for s in measured], label=label, **style)
    for threshold in THRESHOLDS:
        axis.axhline(threshold, color="grey", lw=0.8, ls=":")
    axis.set_yscale("log")
    axis.set_xlabel(SWEEP_NAMES[family])
    axis.set_ylabel("LAP seconds / component seconds")
    axis.set_title("LAP share (dotted: 5% and 50%)")
    axis.grid(True, which="both", alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8)


def plot_family(rows: Sequence[Row], family: str, config: ScalingConfig, path: Path) -> Path:
    """Log-log seconds per component against the sweep variable (fitted exponent in the legend, over the largest
    widths; LAP ours and scipy on the same axes), and the LAP's share of the statistics pass / curve epoch."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(13, 5.2))
    widths = family_widths(rows, family)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(widths, [str(w) for w in widths])
    plot_seconds(left, rows, family)
    plot_shares(right, rows, family, config)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- markdown
def family_widths(rows: Sequence[Row], family: str) -> list[int]:
    return sorted({int(r["width"]) for r in rows if r["family"] == family})


def report_header(config: ScalingConfig, machine: dict[str, str], command: str, started: str,
                  wall_s: float) -> list[str]:
    """Title, run, machine, data and timing; what each component and derived column is; the caveats."""
    return ["# Scaling study: TSC component costs against layer width", "",
            f"- command: `{command}`",
            f"- date: {started} (UTC), sweep wall time {wall_s:.0f} s",
            f"- machine: {machine['cpu']}, {machine['cores']} cores; torch threads {machine['torch_threads']}, "
            f"our solver's threads {machine['solver_threads']}; load average at the end {machine['load']}",
            f"- software: torch {machine['torch']}, numpy {machine['numpy']}, scipy {machine['scipy']}, "
            f"python {machine['python']}",
            f"- data: {config.samples} synthetic random examples (standard normal inputs, 10 random labels), "
            f"batches of {config.batch_size}; random-init models (seed {config.seed}); "
            f"{'QUICK mode (tiny widths, 1 repeat): not for conclusions' if config.quick else 'full sweep'}",
            f"- timing: median wall seconds of up to {config.repeats} runs after a warm-up, fewer runs (down to 1, the "
            f"first counting) when a run is long against a {config.budget_s:.0f} s budget; `repeats` in the CSV",
            "",
            "Components: `stats` = un-align's statistics pass (self-correlations of every group over the clean set); "
            "`lap_ours` / `lap_scipy` = every group's assignment on those matrices (minimised, attention groups "
            "head-aware), our C++ JV solver vs `scipy.optimize.linear_sum_assignment`, same matrices; `permute` = "
            "applying the permutations; `curve_step` = one Bezier-curve optimiser step (`train_curve` on one batch); "
            "`bn_recal` = BatchNorm recalibration over the clean set (CNN only: the MLP has no normalisation, the "
            "ViT only LayerNorm); `round` = one whole TSC round via `purify` (un-align, curve 1, re-align, curve 2, "
            f"{config.round_curve_steps} optimiser steps per curve, no fine-tune, no verification); `round_lap` = "
            "the assignment seconds inside that round (two solves: un-align's and re-align's; inside `purify` our "
            "solver runs with its default threads). Derived: "
            f"`curve_epoch` = curve_step x {math.ceil(config.samples / config.batch_size)} steps (one epoch over "
            f"the clean set); `round_official` = round + 2 x ({config.official_curve_steps} - "
            f"{config.round_curve_steps}) x curve_step (a round at the paper's {config.official_curve_steps} steps "
            "per curve, extrapolated).", "",
            "Caveats: random-init models on random data, so the correlation matrices are those of untrained "
            "networks (LAP time depends on the matrices; `bench/bench_assign.py` has synthetic un-align/re-align "
            f"cases); the clean set here is {config.samples} examples, smaller than the paper's (2500 on CIFAR-10), "
            "so the statistics pass and a curve epoch are cheaper than in practice and the LAP's share of them is "
            "overstated for a given width.", "",
            f"Exponents k are least-squares slopes in log-log space: over all widths, and over the largest "
            f"{TOP_FIT} (the asymptotic growth; small widths are dominated by fixed overheads).", ""]


def seconds_table(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[str]:
    """Seconds per measured component and derived column, one line per width."""
    sweep = SWEEP_NAMES[family]
    groups = {int(r["width"]): int(r["largest_group"]) for r in rows if r["family"] == family}
    params = {int(r["width"]): int(r["params"]) for r in rows if r["family"] == family}
    present = [c for c in COMPONENTS if series(rows, family, c)]
    derived = derived_series(rows, family, config)
    lines = [f"| {sweep} | largest group | params | " + " | ".join(present + list(derived)) + " |",
             "|---" * (3 + len(present) + len(derived)) + "|"]
    for w in family_widths(rows, family):
        cells = [format_number(series(rows, family, c).get(w, math.nan)) for c in present]
        cells += [format_number(v.get(w, math.nan)) for v in derived.values()]
        lines.append(f"| {w} | {groups[w]} | {params[w]:,} | " + " | ".join(cells) + " |")
    return lines


def exponents_table(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[str]:
    lines = [f"| component | points | k (all) | k (largest {TOP_FIT}) | c (largest {TOP_FIT}) |",
             "|---|---|---|---|---|"]
    for entry in exponent_table(rows, family, config):
        lines.append(f"| {entry['component']} | {entry['points']} | {format_number(entry['exponent'])} | "
                     f"{format_number(entry['exponent_top'])} | {entry['coefficient_top']:.3g} |")
    return lines


def shares_table(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[str]:
    sweep = SWEEP_NAMES[family]
    lines = [f"| {sweep} | ours / stats | scipy / stats | ours / curve epoch | scipy / curve epoch | "
             f"ours / round ({config.round_curve_steps} steps) | ours / round ({config.official_curve_steps} "
             f"steps, extrap.) | scipy / round ({config.official_curve_steps} steps, est.) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in lap_shares(rows, family, config):
        cells = [format_percent(s[key]) for key in ("ours_stats", "scipy_stats", "ours_epoch", "scipy_epoch",
                                                    "round_share", "official_share", "official_share_scipy")]
        lines.append(f"| {s['width']} | " + " | ".join(cells) + " |")
    return lines


def crossings_table(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[str]:
    sweep = SWEEP_NAMES[family]
    lines = [f"| LAP | of | reaches 5% at {sweep} | reaches 50% at {sweep} |", "|---|---|---|---|"]
    references = reference_series(rows, family, config)
    laps = {"ours": series(rows, family, "lap_ours"), "scipy": series(rows, family, "lap_scipy")}
    for name, numerator in laps.items():
        for reference_name, reference in references.items():
            if numerator and reference:
                lines.append(f"| {name} | {reference_name} | {crossing(numerator, reference, THRESHOLDS[0])} | "
                             f"{crossing(numerator, reference, THRESHOLDS[1])} |")
    return lines


def family_section(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[str]:
    """One family's plot and its four tables: seconds, exponents, LAP shares, crossings."""
    return ([f"## {family} (sweep: {SWEEP_NAMES[family]})", "", f"![{family}]({family}.png)", "",
             "### Seconds per component", ""] + seconds_table(rows, family, config)
            + ["", "### Fitted exponents (seconds = c * width^k)", ""] + exponents_table(rows, family, config)
            + ["", "### LAP share", ""] + shares_table(rows, family, config)
            + ["", "scipy / round (est.): the round's assignment seconds scaled by scipy/ours on the un-align "
               "matrices.", "", "### Where the LAP reaches 5% / 50%", ""] + crossings_table(rows, family, config)
            + [""])


def lap_agreement(rows: Sequence[Row]) -> str:
    """Whether ours and scipy reached the same optimal total at every width where both ran."""
    by_point: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["component"] in ("lap_ours", "lap_scipy") and math.isfinite(as_number(r["objective"])):
            by_point.setdefault((r["family"], r["width"]), {})[r["component"]] = as_number(r["objective"])
    diffs = [abs(v["lap_ours"] - v["lap_scipy"]) / max(abs(v["lap_scipy"]), 1e-300)
             for v in by_point.values() if len(v) == 2]
    if not diffs:
        return "Ours and scipy: no width where both ran."
    return (f"Ours and scipy reached the same optimal total at all {len(diffs)} widths where both ran "
            f"(largest relative difference {max(diffs):.1e})." if max(diffs) <= 1e-9 else
            f"WARNING: ours and scipy totals differ (largest relative difference {max(diffs):.1e}).")


def family_answer(rows: Sequence[Row], family: str, config: ScalingConfig) -> str:
    """One bullet: the family's exponents, where the LAP reaches 5% / 50%, its share of an official round."""
    sweep = SWEEP_NAMES[family]
    ours, scipy_ = series(rows, family, "lap_ours"), series(rows, family, "lap_scipy")
    references = reference_series(rows, family, config)
    stats_ref, epoch_ref = references["statistics pass"], references["one curve epoch"]
    k = {name: fit_series(points, TOP_FIT)[0] for name, points in
         (("ours", ours), ("scipy", scipy_), ("stats", stats_ref), ("curve", series(rows, family, "curve_step")))}
    parts = [f"- **{family}** ({sweep} {min(ours, default=0)}-{max(ours, default=0)}): LAP ours ~ "
             f"w^{format_number(k['ours'])}, scipy ~ w^{format_number(k['scipy'])}, statistics pass ~ "
             f"w^{format_number(k['stats'])}, curve step ~ w^{format_number(k['curve'])}."]
    for name, numerator in (("ours", ours), ("scipy", scipy_)):
        if numerator:
            parts.append(f"{name}: 5%/50% of the statistics pass at {crossing(numerator, stats_ref, 0.05)} / "
                         f"{crossing(numerator, stats_ref, 0.5)}; of one curve epoch at "
                         f"{crossing(numerator, epoch_ref, 0.05)} / {crossing(numerator, epoch_ref, 0.5)}.")
    shares = [s for s in lap_shares(rows, family, config) if math.isfinite(s["official_share"])]
    if shares:
        last = shares[-1]
        parts.append(f"In a round at {config.official_curve_steps} steps per curve our LAP is "
                     f"{format_percent(last['official_share'])} of the round at {sweep} {last['width']} (scipy est. "
                     f"{format_percent(last['official_share_scipy'])}).")
    return " ".join(parts)


def skipped_notes(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    """(family, component, note) of every component skipped or whose totals differ, once each, sorted."""
    return sorted({(r["family"], r["component"], r["note"]) for r in rows
                   if r["note"] and (r["seconds"] == "" or "DIFFER" in str(r["note"]))})


def answer_section(rows: Sequence[Row], families: Sequence[str], config: ScalingConfig) -> list[str]:
    """The answer up front: one bullet per family, whether ours and scipy agree, what was capped or skipped."""
    lines = ["## Answer: where does the assignment stop being negligible?", ""]
    lines += [family_answer(rows, family, config) for family in families]
    lines += ["", lap_agreement(rows), ""]
    notes = skipped_notes(rows)
    if notes:
        lines += ["Capped or skipped:", ""] + [f"- {f} {c}: {n}" for f, c, n in notes] + [""]
    return lines


def markdown_report(rows: Sequence[Row], config: ScalingConfig, machine: dict[str, str], command: str,
                    started: str, wall_s: float) -> str:
    """report.md: the header, the answer, then one section per family that has rows."""
    families = [f for f in config.families if any(r["family"] == f for r in rows)]
    sections = [line for family in families for line in family_section(rows, family, config)]
    return "\n".join(report_header(config, machine, command, started, wall_s)
                     + answer_section(rows, families, config) + sections) + "\n"


# ---------------------------------------------------------------------------------------------- all outputs
def write_outputs(rows: Sequence[Row], config: ScalingConfig, out: Path, command: str, started: str,
                  wall_s: float) -> dict[str, str]:
    """scaling.csv, one PNG per family with rows, report.md and command.txt in ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(write_csv(rows, out / "scaling.csv"))}
    for family in config.families:
        if any(r["family"] == family for r in rows):
            files[f"plot_{family}"] = str(plot_family(rows, family, config, out / f"{family}.png"))
    report = markdown_report(rows, config, machine_description(config.threads), command, started, wall_s)
    (out / "report.md").write_text(report)
    files["markdown"] = str(out / "report.md")
    (out / "command.txt").write_text(command + "\n")
    files["command"] = str(out / "command.txt")
    return files
