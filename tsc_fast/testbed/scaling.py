"""Scaling study (``tsc-fast bench scaling``): how each TSC component's cost grows with layer width.

Three families, each swept over one width knob on synthetic random data (nothing is downloaded):

- ``mlp``: :class:`~tsc_fast.models.MLP`, 64 inputs, two hidden layers of ``h`` units (two h-unit groups,
  one h x h layer), h = 256 ... 16384;
- ``cnn``: :class:`~tsc_fast.models.DigitsCNN` on 1x8x8 images, width 32 * multiplier (groups of 32m and
  64m channels), multiplier 1 ... 16;
- ``vit``: torchvision's ``VisionTransformer`` (32x32 images, patch 8, hidden 64, 4 heads, 2 layers), MLP dim
  = 64 * ratio, ratio 1 ... 16.

Components, each timed on its real code path (median wall seconds of several runs, fewer when one run is long):

- ``stats``: the un-align statistics pass (:func:`~tsc_fast.stats.self_correlations`) over the clean set;
- ``lap_ours`` / ``lap_scipy``: every group's assignment on those matrices (minimised, head-aware for attention
  groups, as un-align solves them) with our solver and with scipy; both optimal totals are recorded;
- ``permute``: applying the permutations (:func:`~tsc_fast.spec.permute`);
- ``curve_step``: one curve optimiser step (:func:`~tsc_fast.curve.train_curve` on a one-batch list);
- ``bn_recal``: BatchNorm recalibration (:func:`~tsc_fast.curve.recalibrate_bn`; families with BatchNorm only);
- ``round``: one whole TSC round (:func:`~tsc_fast.tsc.purify`, 1 round, a few curve steps, no fine-tune) and
  ``round_lap``, the assignment seconds inside it (un-align and re-align).

Outputs: ``scaling.csv`` (one row per family, width and component), ``report.md`` (tables, fitted power-law
exponents, where the assignment stops being negligible), one log-log PNG per family and ``command.txt``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import reports

FAMILIES = ("mlp", "cnn", "vit")
SWEEP_NAMES = {"mlp": "hidden", "cnn": "multiplier", "vit": "mlp_ratio"}
COMPONENTS = ("stats", "lap_ours", "lap_scipy", "permute", "curve_step", "bn_recal", "round", "round_lap")
CURVE_COMPONENTS = ("curve_step", "bn_recal")          # capped by --curve-max-width
ROUND_COMPONENTS = ("round", "round_lap")              # capped by --round-max-width
TIMED_FIT_COMPONENTS = ("stats", "lap_ours", "lap_scipy", "permute", "curve_step", "bn_recal", "round")
THRESHOLDS = (0.05, 0.5)
CSV_FIELDS = ("family", "sweep", "width", "largest_group", "groups", "params", "component", "seconds", "repeats",
              "backend", "threads", "samples", "objective", "note")


# ---------------------------------------------------------------------------------------------- configuration
@dataclass
class ScalingConfig:
    """What the sweep runs. ``ScalingConfig()`` is the full study; ``ScalingConfig.quick()`` a seconds-long one."""

    families: tuple[str, ...] = FAMILIES
    mlp_widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    mlp_in: int = 64
    cnn_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16)
    cnn_base_width: int = 32
    cnn_image: int = 8
    vit_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    vit_hidden: int = 64
    vit_heads: int = 4
    vit_layers: int = 2
    vit_image: int = 32
    vit_patch: int = 8
    samples: int = 512                 # clean examples: the statistics pass, BN recalibration and the round's data
    batch_size: int = 128              # statistics batches and curve batches (TSC's stats_batch_size is 128)
    round_curve_steps: int = 4         # optimiser steps per curve inside the timed whole round
    official_curve_steps: int = 2000   # the paper's steps per curve, for the extrapolated round
    repeats: int = 5                   # timed runs per component and width (at most) ...
    budget_s: float = 20.0             # ... fewer when they would take longer than this
    max_width: int | None = None       # drop sweep points whose largest group exceeds this
    scipy_max_width: int | None = 8192  # scipy's LAP only up to this largest group (it is cubic-ish)
    curve_max_width: int | None = None  # curve step and BN recalibration only up to this largest group
    round_max_width: int | None = None  # the whole round only up to this largest group
    memory_fraction: float = 0.8       # skip a component whose estimated peak exceeds this share of free memory
    threads: int | None = None         # torch threads and our solver's threads (None: library defaults)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "ScalingConfig":
        """Tiny widths, one repeat, one thread: the whole sweep in seconds (tests, CI). One thread also keeps
        tiny workloads from stalling in torch's thread pool on a busy machine."""
        settings = dict(mlp_widths=(32, 64, 128), cnn_multipliers=(1, 2, 4), cnn_base_width=4, vit_ratios=(1, 2, 4),
                        vit_hidden=16, vit_heads=2, samples=64, batch_size=32, round_curve_steps=2, repeats=1,
                        budget_s=2.0, threads=1, quick=True)
        settings.update(overrides)
        return cls(**settings)


@dataclass
class SweepPoint:
    family: str
    width: int                 # the sweep variable: hidden units, width multiplier or MLP ratio
    largest_group: int         # units of the largest permutation group it gives


def sweep_points(config: ScalingConfig) -> list[SweepPoint]:
    """Every (family, width) of the sweep, in order, without those whose largest group exceeds max_width."""
    points = []
    for family in config.families:
        if family == "mlp":
            points += [SweepPoint("mlp", h, h) for h in config.mlp_widths]
        elif family == "cnn":
            points += [SweepPoint("cnn", m, 2 * config.cnn_base_width * m) for m in config.cnn_multipliers]
        elif family == "vit":
            points += [SweepPoint("vit", r, max(config.vit_hidden, config.vit_hidden * r)) for r in config.vit_ratios]
        else:
            raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if config.max_width is not None:
        points = [p for p in points if p.largest_group <= config.max_width]
    return points


def build_model(family: str, width: int, config: ScalingConfig):
    """(model in eval mode, input shape of one example) for a sweep point; seeded, random weights."""
    import torch

    torch.manual_seed(config.seed)
    if family == "mlp":
        from ..models import MLP

        return MLP(in_features=config.mlp_in, hidden=width, depth=2).eval(), (config.mlp_in,)
    if family == "cnn":
        from ..models import DigitsCNN

        return DigitsCNN(width=config.cnn_base_width * width).eval(), (1, config.cnn_image, config.cnn_image)
    if family == "vit":
        from torchvision.models import VisionTransformer

        model = VisionTransformer(image_size=config.vit_image, patch_size=config.vit_patch,
                                  num_layers=config.vit_layers, num_heads=config.vit_heads,
                                  hidden_dim=config.vit_hidden, mlp_dim=config.vit_hidden * width, num_classes=10)
        return model.eval(), (3, config.vit_image, config.vit_image)
    raise ValueError(f"unknown family {family!r}")


def synthetic_data(input_shape: Sequence[int], samples: int, seed: int = 0, classes: int = 10):
    """A TensorDataset of ``samples`` standard-normal inputs and uniform labels of ``classes`` classes."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *input_shape), generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(x, y)


def batches_of(dataset, batch_size: int) -> list:
    """The dataset as a list of (x, y) batches, in order (what the statistics pass and BN recalibration read)."""
    x, y = dataset.tensors
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


# ---------------------------------------------------------------------------------------------- pure helpers
def fit_power_law(widths: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of seconds = coefficient * width ** exponent in log-log space: (exponent, coefficient).

    Points with a non-positive or non-finite width or time are left out; ValueError with fewer than two distinct
    widths left.
    """
    pairs = [(float(w), float(s)) for w, s in zip(widths, seconds)
             if math.isfinite(float(w)) and math.isfinite(float(s)) and float(w) > 0 and float(s) > 0]
    if len({w for w, _ in pairs}) < 2:
        raise ValueError(f"a power law needs at least two distinct positive widths, got {len(pairs)} usable points")
    x = np.log([w for w, _ in pairs])
    y = np.log([s for _, s in pairs])
    exponent, intercept = np.polyfit(x, y, 1)
    return float(exponent), float(math.exp(intercept))


def timed(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[float, int, Any]:
    """(median seconds, runs timed, the last run's return value) of ``fn``.

    The first call is timed; when a call is short against ``budget_s`` it is treated as a warm-up and ``repeats``
    further calls are timed, otherwise only as many more as fit the budget (the first call counts then). Each
    run's value is dropped before the next run starts, so two results never coexist in memory.
    """
    start = time.perf_counter()
    value = fn()
    first = time.perf_counter() - start
    if repeats <= 1 and first * 2 > budget_s:
        return first, 1, value
    if first * (repeats + 1) <= budget_s:
        times: list[float] = []
        runs = repeats
    else:
        times = [first]
        runs = max(0, min(repeats, int(budget_s // max(first, 1e-9))) - 1)
    for _ in range(runs):
        value = None
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times), value


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_peak_bytes(component: str, params: int, group_sizes: Sequence[int]) -> int:
    """Rough peak extra memory of a component (float32 parameters, float64 statistics).

    stats: per group a running and a per-batch (n x n) float64 matrix plus merge temporaries (about 5 n^2 doubles
    for the group being updated, 2 for the others); curve step: start, end, middle, template, w(t), gradient,
    momentum and temporaries (about 10 parameter copies); round: about 16 (the curve's copies plus the models of
    both stages); LAP: our solver reads the matrix in place, scipy makes a float64 copy.
    """
    squares = [8 * n * n for n in group_sizes]
    if component == "stats":
        return int(sum(2 * s for s in squares) + 3 * max(squares, default=0))
    if component in ("curve_step", "bn_recal"):
        return 10 * 4 * params
    if component in ("round", "round_lap"):
        return 16 * 4 * params + int(sum(2 * s for s in squares) + 3 * max(squares, default=0))
    if component == "lap_scipy":
        return 2 * max(squares, default=0)
    return 4 * params


# ---------------------------------------------------------------------------------------------- measurement
def solve_all(costs: dict[str, np.ndarray], spec, backend: str, threads: int | None = None
              ) -> tuple[dict[str, np.ndarray], float]:
    """Every group's un-align assignment (minimised; plain groups in one batch, attention groups head-aware, as
    :mod:`tsc_fast.align` solves them) and the summed optimal cost over all groups."""
    from .. import assign
    from ..align import solve_groups

    perms = solve_groups(costs, spec, maximize=False, backend=backend, threads=threads)
    total = sum(assign.assignment_cost(costs[g], perms[g]) for g in costs)
    return perms, float(total)


def cost_matrices(model, spec, batches) -> dict[str, np.ndarray]:
    """Un-align's cost matrices: every group's self-correlation as a float64 numpy matrix."""
    from ..stats import self_correlations

    return {g: c.detach().cpu().double().numpy() for g, c in self_correlations(model, spec, batches).items()}


def _has_batch_norm(model) -> bool:
    import torch.nn as nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def measure_point(point: SweepPoint, config: ScalingConfig, log: Callable[[str], None] = print
                  ) -> list[dict[str, Any]]:
    """Time every component at one sweep point; one row per component (components skipped carry a note)."""
    from ..curve import BezierCurve, recalibrate_bn, train_curve
    from ..spec import discover, permute
    from ..tsc import TSCConfig, purify

    model, shape = build_model(point.family, point.width, config)
    dataset = synthetic_data(shape, config.samples, config.seed)
    batches = batches_of(dataset, config.batch_size)
    spec = discover(model, batches[0][0][:2])
    groups = list(spec.groups.values())
    params = sum(p.numel() for p in model.parameters())
    base = dict(family=point.family, sweep=SWEEP_NAMES[point.family], width=point.width,
                largest_group=max(groups), groups=len(groups), params=params, threads=config.threads or "",
                samples=config.samples)
    rows: list[dict[str, Any]] = []

    def add(component: str, seconds: float | None, repeats: int = 0, backend: str = "", objective: Any = "",
            note: str = "") -> None:
        rows.append({**base, "component": component, "seconds": "" if seconds is None else seconds,
                     "repeats": repeats, "backend": backend, "objective": objective, "note": note})
        shown = "skipped" if seconds is None else f"{seconds:.4g} s x{repeats}"
        log(f"  {point.family} {SWEEP_NAMES[point.family]}={point.width} {component}: {shown} {note}".rstrip())

    def too_big(component: str, cap: int | None) -> str:
        if cap is not None and point.largest_group > cap:
            return f"capped: largest group {point.largest_group} > {cap}"
        free = available_memory_bytes()
        need = estimated_peak_bytes(component, params, groups)
        if free is not None and need > config.memory_fraction * free:
            return f"skipped: needs ~{need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB available"
        return ""

    def run(fn):
        return timed(fn, config.repeats, config.budget_s)

    def release() -> None:
        """Collect reference cycles before the next large allocation (a full collection costs ~0.2 s, so only
        where the model is large enough for its freed copies to matter)."""
        if params * 4 >= 2 ** 26:
            gc.collect()

    # statistics pass (un-align's self-correlations) -> the cost matrices
    reason = too_big("stats", None)
    if reason:   # nothing else can run without the matrices
        for component in COMPONENTS:
            if component != "bn_recal" or _has_batch_norm(model):
                add(component, None, note=reason)
        return rows
    seconds, repeats, costs = run(lambda: cost_matrices(model, spec, batches))
    add("stats", seconds, repeats, backend="torch")
    release()

    # LAP: ours, then scipy on the very same matrices
    seconds, repeats, (perms, total_ours) = run(lambda: solve_all(costs, spec, "native", config.threads))
    add("lap_ours", seconds, repeats, backend="native", objective=total_ours)
    reason = too_big("lap_scipy", config.scipy_max_width)
    if reason:
        add("lap_scipy", None, backend="scipy", note=reason)
    else:
        seconds, repeats, total_scipy = run(lambda: solve_all(costs, spec, "scipy")[1])
        note = "" if math.isclose(total_scipy, total_ours, rel_tol=1e-9, abs_tol=1e-9) else "TOTALS DIFFER"
        add("lap_scipy", seconds, repeats, backend="scipy", objective=total_scipy, note=note)
    costs = None   # free the matrices before the models grow
    release()

    # applying the permutations
    seconds, repeats, permuted = run(lambda: permute(model, spec, perms))
    add("permute", seconds, repeats, backend="torch")

    # one curve optimiser step and BN recalibration of a point on the curve
    has_bn = _has_batch_norm(model)
    reason = too_big("curve_step", config.curve_max_width)
    if reason:
        add("curve_step", None, note=reason)
        if has_bn:
            add("bn_recal", None, note=reason)
    else:
        curve = BezierCurve(model, permuted)
        one_batch = [batches[0]]
        seconds, repeats, _ = run(lambda: train_curve(curve, one_batch, 1, progress=False))
        add("curve_step", seconds, repeats, backend="torch",
            note=f"batch {len(one_batch[0][0])}")
        if has_bn:
            point_model = curve.point(0.4)
            seconds, repeats, _ = run(lambda: recalibrate_bn(point_model, batches))
            add("bn_recal", seconds, repeats, backend="torch")
            del point_model
        del curve
    del permuted
    release()

    # one whole round, a few optimiser steps per curve
    reason = too_big("round", config.round_max_width)
    if reason:
        add("round", None, note=reason)
        add("round_lap", None, note=reason)
    else:
        tsc_config = TSCConfig(rounds=1, curve_steps=config.round_curve_steps, batch_size=config.batch_size,
                               stats_batch_size=config.batch_size, finetune_epochs=0, progress=False,
                               warn_below_steps=0, verify=False, seed=config.seed)

        laps: list[float] = []

        def one_round() -> None:
            result = purify(model, dataset, config=tsc_config)
            laps.append(sum(h["seconds"].get("align_assign", 0.0) for h in result.history))

        seconds, repeats, _ = run(one_round)
        lap = statistics.median(laps[-repeats:])
        note = f"{config.round_curve_steps} steps per curve, batch {config.batch_size}, no fine-tune"
        add("round", seconds, repeats, backend="native", note=note)
        add("round_lap", lap, repeats, backend="native", note="assignment seconds inside the round (2 solves)")
    model = None
    release()
    return rows


def run_sweep(config: ScalingConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every sweep point's rows, in order."""
    rows = []
    start = time.perf_counter()
    for point in sweep_points(config):
        log(f"[{time.perf_counter() - start:6.0f} s] {point.family} {SWEEP_NAMES[point.family]}={point.width} "
            f"(largest group {point.largest_group})")
        rows += measure_point(point, config, log)
    return rows


# ---------------------------------------------------------------------------------------------- analysis
def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def series(rows: Iterable[dict[str, Any]], family: str, component: str) -> dict[int, float]:
    """{width: seconds} of one family's component (measured points only)."""
    out = {}
    for row in rows:
        if row["family"] == family and row["component"] == component and math.isfinite(_num(row["seconds"])):
            out[int(row["width"])] = _num(row["seconds"])
    return dict(sorted(out.items()))


def curve_epoch(rows, family: str, config: ScalingConfig) -> dict[int, float]:
    """Seconds of one curve epoch over the clean set: the curve step times steps per epoch."""
    steps = math.ceil(config.samples / config.batch_size)
    return {w: s * steps for w, s in series(rows, family, "curve_step").items()}


def official_round(rows, family: str, config: ScalingConfig) -> dict[int, float]:
    """A round at the paper's steps per curve, extrapolated: the measured round plus the missing curve steps."""
    step = series(rows, family, "curve_step")
    extra = 2 * (config.official_curve_steps - config.round_curve_steps)
    return {w: s + extra * step[w] for w, s in series(rows, family, "round").items() if w in step}


def safe_fit(points: dict[int, float], top: int | None = None) -> tuple[float, float]:
    """fit_power_law over the points (the ``top`` largest widths only when given); (nan, nan) if too few."""
    items = sorted(points.items())
    if top is not None:
        items = items[-top:]
    try:
        return fit_power_law([w for w, _ in items], [s for _, s in items])
    except ValueError:
        return math.nan, math.nan


TOP_FIT = 4   # the asymptotic exponent: fitted over the largest widths only
EXTRAPOLATE_LIMIT = 16   # crossings are extrapolated at most this factor beyond the largest measured width


def _reference_series(rows, family: str, config: ScalingConfig) -> dict[str, dict[int, float]]:
    return {"statistics pass": series(rows, family, "stats"), "one curve epoch": curve_epoch(rows, family, config),
            "round at the official steps": official_round(rows, family, config)}


def crossing(numerator: dict[int, float], denominator: dict[int, float], threshold: float) -> str:
    """The width from which on numerator / denominator stays at or above ``threshold``: a measured width, or, when
    the largest measured width is still below it, one extrapolated from the two series' power laws (fitted over
    their largest widths, at most ``EXTRAPOLATE_LIMIT`` times beyond the sweep)."""
    shared = sorted(set(numerator) & set(denominator))
    if not shared:
        return "n/a"
    above = [numerator[w] / denominator[w] >= threshold for w in shared]
    if above[-1]:   # the width from which on the ratio stays at or above the threshold
        first = len(above)
        while first > 0 and above[first - 1]:
            first -= 1
        return f"<= {shared[0]}" if first == 0 else f"{shared[first]}"
    k1, c1 = safe_fit(numerator, TOP_FIT)
    k2, c2 = safe_fit(denominator, TOP_FIT)
    if not all(math.isfinite(v) for v in (k1, c1, k2, c2)) or k1 <= k2:
        return "not reached (ratio does not grow)"
    log_w = math.log(threshold * c2 / c1) / (k1 - k2)   # in logs: a slowly growing ratio would overflow
    last = shared[-1]
    if log_w > math.log(EXTRAPOLATE_LIMIT * last):
        return f"not reached (beyond {EXTRAPOLATE_LIMIT}x the largest width)"
    if log_w <= math.log(last):   # the fits disagree with the last measurement: say what was measured
        return f"> {last} ({_pct(numerator[last] / denominator[last])} at {last})"
    w_star = math.exp(log_w)
    return f"~{w_star:,.0f} (extrapolated)" if w_star >= 10 else f"~{w_star:.2g} (extrapolated)"


def exponent_table(rows, family: str, config: ScalingConfig) -> list[dict[str, Any]]:
    table = []
    extra = {"curve_epoch": curve_epoch(rows, family, config), "round_official": official_round(rows, family, config)}
    for component in (*TIMED_FIT_COMPONENTS, "round_lap", *extra):
        points = extra[component] if component in extra else series(rows, family, component)
        if not points:
            continue
        k_all, c_all = safe_fit(points)
        k_top, c_top = safe_fit(points, TOP_FIT)
        table.append(dict(component=component, points=len(points), exponent=k_all, coefficient=c_all,
                          exponent_top=k_top, coefficient_top=c_top))
    return table


def lap_shares(rows, family: str, config: ScalingConfig) -> list[dict[str, Any]]:
    """Per width: the LAP (ours, scipy) against the statistics pass, one curve epoch, and the round."""
    ours, scipy_ = series(rows, family, "lap_ours"), series(rows, family, "lap_scipy")
    stats_, epoch = series(rows, family, "stats"), curve_epoch(rows, family, config)
    round_, round_lap = series(rows, family, "round"), series(rows, family, "round_lap")
    official = official_round(rows, family, config)
    out = []
    for w in sorted(set(ours) | set(stats_)):
        def ratio(a: dict, b: dict) -> float:
            return a[w] / b[w] if w in a and w in b and b[w] > 0 else math.nan

        entry = dict(width=w, ours_stats=ratio(ours, stats_), scipy_stats=ratio(scipy_, stats_),
                     ours_epoch=ratio(ours, epoch), scipy_epoch=ratio(scipy_, epoch),
                     round_share=ratio(round_lap, round_), official_share=ratio(round_lap, official))
        if w in round_lap and w in official and w in ours and w in scipy_ and ours[w] > 0:
            est = round_lap[w] * scipy_[w] / ours[w]
            entry["official_share_scipy"] = est / (official[w] - round_lap[w] + est)
        else:
            entry["official_share_scipy"] = math.nan
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- outputs
def machine_description(threads: int | None) -> dict[str, str]:
    import torch

    import scipy

    from .machine import cpu_model

    cpu = cpu_model()

    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "solver_threads": str(threads) if threads else f"{os.cpu_count()} (solve_many default)",
            "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "python": platform.python_version(), "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The rows' ``CSV_FIELDS`` columns, in that order (missing values empty), through ``reports.write_csv``."""
    return reports.write_csv([{k: row.get(k, "") for k in CSV_FIELDS} for row in rows], path)


read_csv = reports.read_csv  # numbers come back as numbers; empty cells as ""


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:.2g}%" if value < 0.1 else f"{100 * value:.0f}%"


def plot_family(rows, family: str, config: ScalingConfig, path: Path) -> Path:
    """Log-log seconds per component against the sweep variable (fitted exponent in the legend, over the largest
    widths; LAP ours and scipy on the same axes), and the LAP's share of the statistics pass / curve epoch."""
    from ..figures import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"lap_ours": dict(color="C3", lw=2.4, marker="o"), "lap_scipy": dict(color="C3", ls="--", marker="s"),
              "stats": dict(color="C0", marker="o"), "permute": dict(color="C7", marker="v"),
              "curve_step": dict(color="C2", marker="^"), "bn_recal": dict(color="C4", marker="D"),
              "round": dict(color="k", marker="x"), "round_lap": dict(color="C1", ls=":", marker="x")}
    for component in COMPONENTS:
        points = series(rows, family, component)
        if not points:
            continue
        k, _ = safe_fit(points, TOP_FIT)
        label = f"{component} (k={k:.2f})" if math.isfinite(k) else component
        left.plot(list(points), list(points.values()), label=label, **styles.get(component, {}))
    widths = sorted({int(r["width"]) for r in rows if r["family"] == family})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(widths, [str(w) for w in widths])
    left.set_yscale("log")
    left.set_xlabel(SWEEP_NAMES[family])
    left.set_ylabel("median wall seconds")
    left.set_title(f"{family}: seconds per component (k: log-log slope, largest {TOP_FIT} widths)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    shares = lap_shares(rows, family, config)
    for key, label, style in (("ours_stats", "ours / stats pass", dict(color="C3", marker="o")),
                              ("scipy_stats", "scipy / stats pass", dict(color="C3", ls="--", marker="s")),
                              ("ours_epoch", "ours / curve epoch", dict(color="C2", marker="o")),
                              ("scipy_epoch", "scipy / curve epoch", dict(color="C2", ls="--", marker="s")),
                              ("official_share", "ours / round (2000 steps)", dict(color="k", marker="x"))):
        xs = [s["width"] for s in shares if math.isfinite(s[key])]
        if xs:
            right.plot(xs, [s[key] for s in shares if math.isfinite(s[key])], label=label, **style)
    for threshold in THRESHOLDS:
        right.axhline(threshold, color="grey", lw=0.8, ls=":")
    right.set_yscale("log")
    right.set_xlabel(SWEEP_NAMES[family])
    right.set_ylabel("LAP seconds / component seconds")
    right.set_title("LAP share (dotted: 5% and 50%)")
    right.grid(True, which="both", alpha=0.3)
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(rows, config: ScalingConfig, machine: dict[str, str], command: str,
                    started: str, wall_s: float) -> str:
    lines = ["# Scaling study: TSC component costs against layer width", "",
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
    notes = sorted({(r["family"], r["component"], r["note"]) for r in rows
                    if r["note"] and (r["seconds"] == "" or "DIFFER" in str(r["note"]))})
    answer = ["## Answer: where does the assignment stop being negligible?", ""]
    body = []
    for family in [f for f in config.families if any(r["family"] == f for r in rows)]:
        sweep = SWEEP_NAMES[family]
        widths = sorted({int(r["width"]) for r in rows if r["family"] == family})
        groups = {int(r["width"]): int(r["largest_group"]) for r in rows if r["family"] == family}
        params = {int(r["width"]): int(r["params"]) for r in rows if r["family"] == family}
        body += [f"## {family} (sweep: {sweep})", "", f"![{family}]({family}.png)", "",
                 "### Seconds per component", ""]
        present = [c for c in COMPONENTS if series(rows, family, c)]
        extra = {"curve_epoch": curve_epoch(rows, family, config),
                 "round_official": official_round(rows, family, config)}
        body.append(f"| {sweep} | largest group | params | " + " | ".join(present + list(extra)) + " |")
        body.append("|---" * (3 + len(present) + len(extra)) + "|")
        for w in widths:
            cells = [_fmt(series(rows, family, c).get(w, math.nan)) for c in present]
            cells += [_fmt(v.get(w, math.nan)) for v in extra.values()]
            body.append(f"| {w} | {groups[w]} | {params[w]:,} | " + " | ".join(cells) + " |")
        body += ["", "### Fitted exponents (seconds = c * width^k)", "",
                 f"| component | points | k (all) | k (largest {TOP_FIT}) | c (largest {TOP_FIT}) |",
                 "|---|---|---|---|---|"]
        for entry in exponent_table(rows, family, config):
            body.append(f"| {entry['component']} | {entry['points']} | {_fmt(entry['exponent'])} | "
                        f"{_fmt(entry['exponent_top'])} | {entry['coefficient_top']:.3g} |")
        body += ["", "### LAP share", "",
                 f"| {sweep} | ours / stats | scipy / stats | ours / curve epoch | scipy / curve epoch | "
                 f"ours / round ({config.round_curve_steps} steps) | ours / round ({config.official_curve_steps} "
                 f"steps, extrap.) | scipy / round ({config.official_curve_steps} steps, est.) |",
                 "|---|---|---|---|---|---|---|---|"]
        for s in lap_shares(rows, family, config):
            body.append(f"| {s['width']} | {_pct(s['ours_stats'])} | {_pct(s['scipy_stats'])} | "
                        f"{_pct(s['ours_epoch'])} | {_pct(s['scipy_epoch'])} | {_pct(s['round_share'])} | "
                        f"{_pct(s['official_share'])} | {_pct(s['official_share_scipy'])} |")
        body += ["", "scipy / round (est.): the round's assignment seconds scaled by scipy/ours on the un-align "
                 "matrices.", "", "### Where the LAP reaches 5% / 50%", "",
                 f"| LAP | of | reaches 5% at {sweep} | reaches 50% at {sweep} |", "|---|---|---|---|"]
        refs = _reference_series(rows, family, config)
        lap = {"ours": series(rows, family, "lap_ours"), "scipy": series(rows, family, "lap_scipy")}
        for name, numerator in lap.items():
            for ref_name, reference in refs.items():
                if numerator and reference:
                    body.append(f"| {name} | {ref_name} | {crossing(numerator, reference, THRESHOLDS[0])} | "
                                f"{crossing(numerator, reference, THRESHOLDS[1])} |")
        body.append("")
        answer.append(_family_answer(rows, family, config))
    totals_agree = _lap_agreement(rows)
    answer += ["", totals_agree, ""]
    if notes:
        answer += ["Capped or skipped:", ""] + [f"- {f} {c}: {n}" for f, c, n in notes] + [""]
    return "\n".join(lines + answer + body) + "\n"


def _lap_agreement(rows) -> str:
    diffs = []
    by_point: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["component"] in ("lap_ours", "lap_scipy") and math.isfinite(_num(r["objective"])):
            by_point.setdefault((r["family"], r["width"]), {})[r["component"]] = _num(r["objective"])
    for values in by_point.values():
        if len(values) == 2:
            a, b = values["lap_ours"], values["lap_scipy"]
            diffs.append(abs(a - b) / max(abs(b), 1e-300))
    if not diffs:
        return "Ours and scipy: no width where both ran."
    return (f"Ours and scipy reached the same optimal total at all {len(diffs)} widths where both ran "
            f"(largest relative difference {max(diffs):.1e})." if max(diffs) <= 1e-9 else
            f"WARNING: ours and scipy totals differ (largest relative difference {max(diffs):.1e}).")


def _family_answer(rows, family: str, config: ScalingConfig) -> str:
    sweep = SWEEP_NAMES[family]
    ours, scipy_ = series(rows, family, "lap_ours"), series(rows, family, "lap_scipy")
    refs = _reference_series(rows, family, config)
    k = {name: safe_fit(points, TOP_FIT)[0] for name, points in
         (("ours", ours), ("scipy", scipy_), ("stats", refs["statistics pass"]),
          ("curve", series(rows, family, "curve_step")))}
    parts = [f"- **{family}** ({sweep} {min(ours, default=0)}-{max(ours, default=0)}): LAP ours ~ w^{_fmt(k['ours'])}, "
             f"scipy ~ w^{_fmt(k['scipy'])}, statistics pass ~ w^{_fmt(k['stats'])}, curve step ~ "
             f"w^{_fmt(k['curve'])}."]
    for name, numerator in (("ours", ours), ("scipy", scipy_)):
        if not numerator:
            continue
        stats_ref, epoch_ref = refs["statistics pass"], refs["one curve epoch"]
        parts.append(f"{name}: 5%/50% of the statistics pass at {crossing(numerator, stats_ref, 0.05)} / "
                     f"{crossing(numerator, stats_ref, 0.5)}; of one curve epoch at "
                     f"{crossing(numerator, epoch_ref, 0.05)} / {crossing(numerator, epoch_ref, 0.5)}.")
    shares = [s for s in lap_shares(rows, family, config) if math.isfinite(s["official_share"])]
    if shares:
        last = shares[-1]
        parts.append(f"In a round at {config.official_curve_steps} steps per curve our LAP is "
                     f"{_pct(last['official_share'])} of the round at {sweep} {last['width']} (scipy est. "
                     f"{_pct(last['official_share_scipy'])}).")
    return " ".join(parts)


def write_outputs(rows: Sequence[dict[str, Any]], config: ScalingConfig, out: Path, command: str,
                  started: str, wall_s: float) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(write_csv(rows, out / "scaling.csv"))}
    for family in config.families:
        if any(r["family"] == family for r in rows):
            files[f"plot_{family}"] = str(plot_family(rows, family, config, out / f"{family}.png"))
    machine = machine_description(config.threads)
    report = markdown_report(rows, config, machine, command, started, wall_s)
    (out / "report.md").write_text(report)
    files["markdown"] = str(out / "report.md")
    (out / "command.txt").write_text(command + "\n")
    files["command"] = str(out / "command.txt")
    return files


def run_study(config: ScalingConfig, out: Path, command: str, log: Callable[[str], None] = print
              ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Set threads, run the sweep, write every output; torch's thread count is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    try:
        rows = run_sweep(config, log)
        files = write_outputs(rows, config, out, command, started, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return rows, files


# ---------------------------------------------------------------------------------------------- command line
def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def config_from_args(args: argparse.Namespace) -> ScalingConfig:
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    settings: dict[str, Any] = dict(families=families, max_width=args.max_width)
    for name in ("threads", "repeats", "budget_s", "samples", "batch_size", "round_curve_steps", "curve_max_width",
                 "round_max_width", "seed"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.scipy_max_width is not None:
        settings["scipy_max_width"] = args.scipy_max_width or None
    for name in ("mlp_widths", "cnn_multipliers", "vit_ratios"):
        if getattr(args, name):
            settings[name] = _int_list(getattr(args, name))
    return ScalingConfig.quick_config(**settings) if args.quick else ScalingConfig(**settings)


def _cmd_bench_scaling(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    argv = getattr(args, "argv", None)
    command = "tsc-fast " + " ".join(shlex.quote(a) for a in argv) if argv is not None else "tsc-fast bench scaling"
    _, files = run_study(config, args.out, command, log=print)
    print(Path(files["markdown"]).read_text())
    print("written: " + ", ".join(files.values()))
    return 0


def add_scaling_parser(kinds) -> argparse.ArgumentParser:
    """``tsc-fast bench scaling``: add the sub-command to the ``bench`` sub-parsers."""
    parser = kinds.add_parser("scaling", help="component costs against layer width: log-log plots, fitted "
                              "exponents, report, CSV")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of mlp,cnn,vit (default all)")
    parser.add_argument("--max-width", type=int, help="skip sweep points whose largest permutation group has more "
                        "units than this")
    parser.add_argument("--repeats", type=int, help="timed runs per component and width, at most (default 5; "
                        "--quick 1); fewer when a run is long")
    parser.add_argument("--budget-s", type=float, help="seconds per component and width that repeats may take "
                        "(default 20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads and our solver's threads (1 recommended "
                        "for stable timings)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, one repeat: seconds in all")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling"),
                        help="output folder (default bench/results/scaling)")
    parser.add_argument("--mlp-widths", help="comma list of MLP hidden widths (default 256,...,16384)")
    parser.add_argument("--cnn-multipliers", help="comma list of CNN width multipliers (default 1,2,4,8,16)")
    parser.add_argument("--vit-ratios", help="comma list of ViT MLP ratios (default 1,2,4,8,16)")
    parser.add_argument("--samples", type=int, help="clean examples (default 512)")
    parser.add_argument("--batch-size", type=int, help="statistics and curve batch (default 128)")
    parser.add_argument("--round-curve-steps", type=int, help="optimiser steps per curve in the timed round "
                        "(default 4)")
    parser.add_argument("--scipy-max-width", type=int, help="largest group up to which scipy's LAP runs "
                        "(default 8192; 0: no cap)")
    parser.add_argument("--curve-max-width", type=int, help="largest group up to which the curve step and BN "
                        "recalibration run (default: no cap but the memory check)")
    parser.add_argument("--round-max-width", type=int, help="largest group up to which the whole round runs "
                        "(default: no cap but the memory check)")
    parser.add_argument("--seed", type=int)
    parser.set_defaults(run=_cmd_bench_scaling)
    return parser


__all__ = ["ScalingConfig", "SweepPoint", "sweep_points", "build_model", "synthetic_data", "fit_power_law", "timed",
           "solve_all", "cost_matrices", "measure_point", "run_sweep", "series", "lap_shares", "crossing",
           "exponent_table", "write_outputs", "run_study", "read_csv", "add_scaling_parser",
           "estimated_peak_bytes", "COMPONENTS", "FAMILIES"]
