"""Timing every TSC component at one sweep point, each on its real code path.

- ``stats``: the un-align statistics pass (:func:`~tsc_fast.stats.self_correlations`) over the clean set;
- ``lap_ours`` / ``lap_scipy``: every group's assignment on those matrices (minimised, head-aware for attention
  groups, as un-align solves them) with our solver and with scipy; both optimal totals are recorded;
- ``permute``: applying the permutations (:func:`~tsc_fast.spec.permute`);
- ``curve_step``: one curve optimiser step (:func:`~tsc_fast.curve.train_curve` on a one-batch list);
- ``bn_recal``: BatchNorm recalibration (:func:`~tsc_fast.curve.recalibrate_bn`; families with BatchNorm only);
- ``round``: one whole TSC round (:func:`~tsc_fast.tsc.purify`, 1 round, a few curve steps, no fine-tune) and
  ``round_lap``, the assignment seconds inside it (un-align and re-align).

Each is the median wall seconds of several runs (:func:`timed`), fewer when one run is long; a component is
skipped with a note when its width cap or the memory guard (:mod:`.guard`) says so.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, TypeVar

import numpy as np
import torch.nn as nn

from ... import assign
from ...align import solve_groups
from ...curve import BezierCurve, recalibrate_bn, train_curve
from ...spec import PermutationSpec, discover, permute
from ...stats import self_correlations
from ...tsc import TSCConfig, purify
from .config import COMPONENTS, SWEEP_NAMES, Row, ScalingConfig
from .guard import skip_reason
from .zoo import Batch, SweepPoint, batches_of, build_model, has_batch_norm, sweep_points, synthetic_data

T = TypeVar("T")
LARGE_MODEL_BYTES = 2 ** 26   # from here on, freed model copies are worth a full garbage collection


def timed(fn: Callable[[], T], repeats: int, budget_s: float) -> tuple[float, int, T]:
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
        value = None  # type: ignore[assignment]
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times), value


def cost_matrices(model: nn.Module, spec: PermutationSpec, batches: list[Batch]) -> dict[str, np.ndarray]:
    """Un-align's cost matrices: every group's self-correlation as a float64 numpy matrix."""
    return {g: c.detach().cpu().double().numpy() for g, c in self_correlations(model, spec, batches).items()}


def solve_all(costs: dict[str, np.ndarray], spec: PermutationSpec, backend: str, threads: int | None = None
              ) -> tuple[dict[str, np.ndarray], float]:
    """Every group's un-align assignment (minimised; plain groups in one batch, attention groups head-aware, as
    :mod:`tsc_fast.align` solves them) and the summed optimal cost over all groups."""
    perms = solve_groups(costs, spec, maximize=False, backend=backend, threads=threads)
    total = sum(assign.assignment_cost(costs[g], perms[g]) for g in costs)
    return perms, float(total)


class PointTimer:
    """One sweep point's model, data and rows while its components are timed."""

    def __init__(self, point: SweepPoint, config: ScalingConfig, log: Callable[[str], None]):
        self.point, self.config, self.log = point, config, log
        self.model, input_shape = build_model(point.family, point.width, config)
        self.dataset = synthetic_data(input_shape, config.samples, config.seed)
        self.batches = batches_of(self.dataset, config.batch_size)
        self.spec = discover(self.model, self.batches[0][0][:2])
        self.group_sizes = list(self.spec.groups.values())
        self.params = sum(p.numel() for p in self.model.parameters())
        self.has_batch_norm = has_batch_norm(self.model)
        self.rows: list[Row] = []

    def base_row(self) -> Row:
        """The columns every row of this point shares."""
        return dict(family=self.point.family, sweep=SWEEP_NAMES[self.point.family], width=self.point.width,
                    largest_group=max(self.group_sizes), groups=len(self.group_sizes), params=self.params,
                    threads=self.config.threads or "", samples=self.config.samples)

    def record(self, component: str, seconds: float | None, repeats: int = 0, backend: str = "",
               objective: Any = "", note: str = "") -> None:
        """One component's row (seconds None: skipped, the note says why), logged as it is added."""
        self.rows.append({**self.base_row(), "component": component, "seconds": "" if seconds is None else seconds,
                          "repeats": repeats, "backend": backend, "objective": objective, "note": note})
        shown = "skipped" if seconds is None else f"{seconds:.4g} s x{repeats}"
        self.log(f"  {self.point.family} {SWEEP_NAMES[self.point.family]}={self.point.width} {component}: "
                 f"{shown} {note}".rstrip())

    def skip_reason(self, component: str, cap: int | None = None) -> str:
        """Why ``component`` must not run here ("" when it may)."""
        return skip_reason(component, self.point.largest_group, self.params, self.group_sizes, cap,
                           self.config.memory_fraction)

    def measure(self, fn: Callable[[], T]) -> tuple[float, int, T]:
        """:func:`timed` with the config's repeats and budget."""
        return timed(fn, self.config.repeats, self.config.budget_s)

    def close(self) -> None:
        """Drop the model and its data and collect them, before the next point builds a larger one."""
        del self.model, self.dataset, self.batches, self.spec
        self.release()

    def release(self) -> None:
        """Collect reference cycles before the next large allocation (a full collection costs ~0.2 s, so only
        where the model is large enough for its freed copies to matter)."""
        if self.params * 4 >= LARGE_MODEL_BYTES:
            gc.collect()


def time_statistics(timer: PointTimer) -> dict[str, np.ndarray] | None:
    """The statistics pass, timed; its cost matrices, or None (every component then skipped: nothing else can
    run without them)."""
    reason = timer.skip_reason("stats")
    if reason:
        for component in COMPONENTS:
            if component != "bn_recal" or timer.has_batch_norm:
                timer.record(component, None, note=reason)
        return None
    seconds, repeats, costs = timer.measure(lambda: cost_matrices(timer.model, timer.spec, timer.batches))
    timer.record("stats", seconds, repeats, backend="torch")
    return costs


def time_assignments(timer: PointTimer, costs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our solver's and then scipy's assignment of the very same matrices, timed; our permutations."""
    threads = timer.config.threads
    seconds, repeats, (perms, total_ours) = timer.measure(lambda: solve_all(costs, timer.spec, "native", threads))
    timer.record("lap_ours", seconds, repeats, backend="native", objective=total_ours)
    reason = timer.skip_reason("lap_scipy", timer.config.scipy_max_width)
    if reason:
        timer.record("lap_scipy", None, backend="scipy", note=reason)
        return perms
    seconds, repeats, total_scipy = timer.measure(lambda: solve_all(costs, timer.spec, "scipy")[1])
    note = "" if math.isclose(total_scipy, total_ours, rel_tol=1e-9, abs_tol=1e-9) else "TOTALS DIFFER"
    timer.record("lap_scipy", seconds, repeats, backend="scipy", objective=total_scipy, note=note)
    return perms


def time_permutation(timer: PointTimer, perms: dict[str, np.ndarray]) -> nn.Module:
    """Applying the permutations, timed; the permuted model (the curve's other end)."""
    seconds, repeats, permuted = timer.measure(lambda: permute(timer.model, timer.spec, perms))
    timer.record("permute", seconds, repeats, backend="torch")
    return permuted


def time_curve(timer: PointTimer, permuted: nn.Module) -> None:
    """One curve optimiser step and, with BatchNorm, the recalibration of a point on the curve, timed."""
    reason = timer.skip_reason("curve_step", timer.config.curve_max_width)
    if reason:
        timer.record("curve_step", None, note=reason)
        if timer.has_batch_norm:
            timer.record("bn_recal", None, note=reason)
        return
    curve = BezierCurve(timer.model, permuted)
    one_batch = [timer.batches[0]]
    seconds, repeats, _ = timer.measure(lambda: train_curve(curve, one_batch, 1, progress=False))
    timer.record("curve_step", seconds, repeats, backend="torch", note=f"batch {len(one_batch[0][0])}")
    if timer.has_batch_norm:
        point_model = curve.point(0.4)
        seconds, repeats, _ = timer.measure(lambda: recalibrate_bn(point_model, timer.batches))
        timer.record("bn_recal", seconds, repeats, backend="torch")


def round_config(config: ScalingConfig) -> TSCConfig:
    """One round at a few curve steps, no fine-tune, no verification: TSC's own loop, small enough to time."""
    return TSCConfig(rounds=1, curve_steps=config.round_curve_steps, batch_size=config.batch_size,
                     stats_batch_size=config.batch_size, finetune_epochs=0, progress=False, warn_below_steps=0,
                     verify=False, seed=config.seed)


def time_round(timer: PointTimer) -> None:
    """One whole TSC round, timed, and the assignment seconds inside it."""
    reason = timer.skip_reason("round", timer.config.round_max_width)
    if reason:
        timer.record("round", None, note=reason)
        timer.record("round_lap", None, note=reason)
        return
    tsc_config = round_config(timer.config)
    laps: list[float] = []   # each run's assignment seconds, from the round's own history

    def one_round() -> None:
        result = purify(timer.model, timer.dataset, config=tsc_config)
        laps.append(sum(h["seconds"].get("align_assign", 0.0) for h in result.history))

    seconds, repeats, _ = timer.measure(one_round)
    note = f"{timer.config.round_curve_steps} steps per curve, batch {timer.config.batch_size}, no fine-tune"
    timer.record("round", seconds, repeats, backend="native", note=note)
    timer.record("round_lap", statistics.median(laps[-repeats:]), repeats, backend="native",
                 note="assignment seconds inside the round (2 solves)")


def measure_point(point: SweepPoint, config: ScalingConfig, log: Callable[[str], None] = print) -> list[Row]:
    """Time every component at one sweep point; one row per component (components skipped carry a note)."""
    timer = PointTimer(point, config, log)
    costs = time_statistics(timer)
    if costs is None:
        return timer.rows
    timer.release()
    perms = time_assignments(timer, costs)
    del costs   # free the matrices before the models grow
    timer.release()
    permuted = time_permutation(timer, perms)
    time_curve(timer, permuted)
    del permuted
    timer.release()
    time_round(timer)
    timer.close()
    return timer.rows


def run_sweep(config: ScalingConfig, log: Callable[[str], None] = print) -> list[Row]:
    """Every sweep point's rows, in order."""
    rows: list[Row] = []
    start = time.perf_counter()
    for point in sweep_points(config):
        log(f"[{time.perf_counter() - start:6.0f} s] {point.family} {SWEEP_NAMES[point.family]}={point.width} "
            f"(largest group {point.largest_group})")
        rows += measure_point(point, config, log)
    return rows
