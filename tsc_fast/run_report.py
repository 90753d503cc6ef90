"""What a purification run leaves for people to look at: ``report.json`` and ``report.png``.

The report holds the metrics before and after (ACC, and ASR/RA when the trigger is known), every round's and
stage's t*, curve losses, permutation costs and timings, the run's settings, and whatever the caller adds about
the model and the data. ``LandscapeRecorder`` adds the loss landscape along the last round's curves.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch.nn as nn

from ._version import __version__
from .curve import BezierCurve, recalibrate_bn
from .figures import draw_landscape, pyplot, save_figure

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
METRICS = ("acc", "asr", "ra")
Evaluate = Callable[[nn.Module], dict]


def curve_profile(curve: BezierCurve, ts: Sequence[float], bn_batches: Iterable[Any], evaluate: Evaluate,
                  device="cpu") -> list[dict[str, float]]:
    """``evaluate`` at each t of ``ts`` along ``curve``, every point's BatchNorm recalibrated first (as at t*)."""
    profile = []
    for t in ts:
        point = curve.point(t)
        recalibrate_bn(point, bn_batches, device=device)
        profile.append({"t": float(t), **evaluate(point.eval())})
    return profile


class LandscapeRecorder:
    """An ``on_curve`` callback for :func:`~tsc_fast.purify` that profiles the curves of round ``round_``
    (default: the last, ``rounds``) at ``points`` evenly spaced t values with ``evaluate`` (model -> dict with at
    least ``clean_loss``; ``poison_loss`` too when the trigger is known)."""

    def __init__(self, evaluate: Evaluate, rounds: int, t_stage1: float, t_stage2: float, points: int = 11,
                 round_: int | None = None, device="cpu"):
        if points < 2:
            raise ValueError(f"a landscape needs at least 2 points, got {points}")
        self.evaluate, self.device = evaluate, device
        self.round = rounds if round_ is None else round_
        self.ts = [i / (points - 1) for i in range(points)]
        self.landscape: dict[str, Any] = {"round": self.round, "t_stage1": t_stage1, "t_stage2": t_stage2}

    def __call__(self, round_: int, stage: int, curve: BezierCurve, bn_batches: Iterable[Any]) -> None:
        if round_ == self.round:
            self.landscape[f"stage{stage}"] = curve_profile(curve, self.ts, bn_batches, self.evaluate, self.device)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: such floats become None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def build_report(result, before: dict | None = None, after: dict | None = None, **context: Any) -> dict[str, Any]:
    """The report of a :class:`~tsc_fast.tsc.TSCResult` as plain JSON-able data.

    ``before`` / ``after``: metrics in percent (``acc``, and ``asr``/``ra`` when known); ``context``: anything
    else worth keeping (the data's layout, the architecture, file paths, the landscape ...).
    """
    stages = []
    for record in result.history:
        stages.append({"round": record["round"], "stage": record["stage"], "t": record["t"],
                       "curve_losses": record["curve_losses"], "perm_cost": record["perm_cost"],
                       "seconds": record["seconds"], **({"finetune_losses": record["finetune_losses"]}
                                                          if "finetune_losses" in record else {})})
    plan = result.plan
    report = {"tool": f"tsc_fast {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "metrics": {"before": before, "after": after}, "stages": stages,
              "groups": dict(result.spec.groups) if result.spec is not None else {},
              "plan": dict(vars(plan)) if plan is not None else None, "seconds": result.seconds,
              "resumed_from": result.resumed_from, **context}
    return _finite_or_none(report)


def _draw_metrics(ax, metrics: dict) -> None:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [m for m in METRICS if m in before or m in after]
    width = 0.38
    for offset, label, row, colour in ((-width / 2, "before", before, "tab:grey"),
                                       (width / 2, "after", after, "tab:green")):
        known = [row.get(m) for m in names]
        bars = ax.bar([i + offset for i in range(len(names))], [v or 0.0 for v in known], width, label=label,
                      color=colour)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in known], fontsize=7)
    ax.set_xticks(range(len(names)), [n.upper() for n in names])
    ax.set_ylim(0, 110)
    ax.set_ylabel("percent")
    ax.set_title("before and after purification", fontsize=9)
    ax.legend(fontsize=8)


def _draw_losses(ax, stages: list[dict]) -> None:
    for s in stages:
        losses = [v for v in s["curve_losses"] if v is not None]
        ax.plot(range(1, len(losses) + 1), losses, label=f"round {s['round']} curve {s['stage']} (t*={s['t']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("curve training loss")
    ax.set_title("curve training", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def _draw_costs(ax, stages: list[dict], groups: dict[str, int]) -> None:
    """Mean correlation of matched units: identity vs the chosen assignment, per stage (summed costs / units)."""
    units = sum(groups.values()) or 1
    labels = [f"r{s['round']} s{s['stage']}" for s in stages]
    identity = [sum(v or 0.0 for v in s["perm_cost"]["identity"].values()) / units for s in stages]
    achieved = [sum(v or 0.0 for v in s["perm_cost"]["achieved"].values()) / units for s in stages]
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], identity, 0.4, label="identity", color="tab:grey")
    ax.bar([x + 0.2 for x in xs], achieved, 0.4, label="assignment", color="tab:blue")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("mean matched correlation")
    ax.set_title("un-align (s1: minimised) / re-align (s2: maximised)", fontsize=9)
    ax.legend(fontsize=7)


def _draw_times(ax, stages: list[dict]) -> None:
    parts = ("align", "curve_and_bn", "finetune")
    labels = [f"r{s['round']} s{s['stage']}" for s in stages]
    bottom = [0.0] * len(stages)
    for part in parts:
        values = [s["seconds"].get(part) or 0.0 for s in stages]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds")
    ax.set_title("where the time went", fontsize=9)
    ax.legend(fontsize=7)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """report.png: metrics, curve losses, permutation costs and timings (and the landscape when recorded)."""
    plt = pyplot()
    landscape = report.get("landscape")
    rows = 3 if landscape else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows))
    metrics = report.get("metrics") or {}
    if metrics.get("before") or metrics.get("after"):
        _draw_metrics(axes[0][0], metrics)
    else:
        axes[0][0].set_axis_off()
        axes[0][0].text(0.5, 0.5, "no test data: no metrics", ha="center", va="center")
    _draw_losses(axes[0][1], report["stages"])
    _draw_costs(axes[1][0], report["stages"], report.get("groups") or {})
    _draw_times(axes[1][1], report["stages"])
    if landscape:
        draw_landscape(axes[2], landscape)
    title = report.get("title") or "TSC purification"
    fig.suptitle(f"{title}  ({report.get('seconds', 0):.0f} s)", fontsize=11)
    return save_figure(fig, path)


def write_json_atomically(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON at ``path``, written to a temporary file and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``out_dir/report.json`` and (``plot``) ``out_dir/report.png``; returns their paths by kind."""
    out_dir = Path(out_dir)
    files = {"json": write_json_atomically(out_dir / REPORT_JSON, report)}
    if plot:
        files["png"] = plot_report(report, out_dir / REPORT_PNG)
    return files
