"""Power laws of the measured seconds and what the report derives from them: each component's series over the
widths, the derived curve epoch and official-length round, fitted exponents, the LAP's shares and the width at
which a share crosses a threshold (measured, or extrapolated along the fitted power laws)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from .config import Row, ScalingConfig
from .formatting import format_percent

Series = dict[int, float]   # {width: seconds}, widths ascending

TIMED_FIT_COMPONENTS = ("stats", "lap_ours", "lap_scipy", "permute", "curve_step", "bn_recal", "round")
TOP_FIT = 4   # the asymptotic exponent: fitted over the largest widths only
EXTRAPOLATE_LIMIT = 16   # crossings are extrapolated at most this factor beyond the largest measured width


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


def fit_series(points: Series, largest: int | None = None) -> tuple[float, float]:
    """fit_power_law over the points (the ``largest`` widths only when given); (nan, nan) if too few."""
    items = sorted(points.items())
    if largest is not None:
        items = items[-largest:]
    try:
        return fit_power_law([w for w, _ in items], [s for _, s in items])
    except ValueError:
        return math.nan, math.nan


def as_number(value: Any) -> float:
    """A CSV cell as a float (nan for an empty or non-numeric cell)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def series(rows: Iterable[Row], family: str, component: str) -> Series:
    """{width: seconds} of one family's component (measured points only)."""
    out = {}
    for row in rows:
        if row["family"] == family and row["component"] == component and math.isfinite(as_number(row["seconds"])):
            out[int(row["width"])] = as_number(row["seconds"])
    return dict(sorted(out.items()))


def curve_epoch(rows: Iterable[Row], family: str, config: ScalingConfig) -> Series:
    """Seconds of one curve epoch over the clean set: the curve step times steps per epoch."""
    steps = math.ceil(config.samples / config.batch_size)
    return {w: s * steps for w, s in series(rows, family, "curve_step").items()}


def official_round(rows: Sequence[Row], family: str, config: ScalingConfig) -> Series:
    """A round at the paper's steps per curve, extrapolated: the measured round plus the missing curve steps."""
    step = series(rows, family, "curve_step")
    extra = 2 * (config.official_curve_steps - config.round_curve_steps)
    return {w: s + extra * step[w] for w, s in series(rows, family, "round").items() if w in step}


def derived_series(rows: Sequence[Row], family: str, config: ScalingConfig) -> dict[str, Series]:
    """The report's derived columns: ``curve_epoch`` and ``round_official``."""
    return {"curve_epoch": curve_epoch(rows, family, config), "round_official": official_round(rows, family, config)}


def reference_series(rows: Sequence[Row], family: str, config: ScalingConfig) -> dict[str, Series]:
    """What the LAP's seconds are compared with, by the report's names for them."""
    return {"statistics pass": series(rows, family, "stats"), "one curve epoch": curve_epoch(rows, family, config),
            "round at the official steps": official_round(rows, family, config)}


def exponent_table(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[dict[str, Any]]:
    """Per measured or derived component: points, exponent and coefficient over all widths and over the largest
    ``TOP_FIT``."""
    table = []
    derived = derived_series(rows, family, config)
    for component in (*TIMED_FIT_COMPONENTS, "round_lap", *derived):
        points = derived[component] if component in derived else series(rows, family, component)
        if not points:
            continue
        k_all, c_all = fit_series(points)
        k_top, c_top = fit_series(points, TOP_FIT)
        table.append(dict(component=component, points=len(points), exponent=k_all, coefficient=c_all,
                          exponent_top=k_top, coefficient_top=c_top))
    return table


def ratio_at(width: int, numerator: Series, denominator: Series) -> float:
    """numerator / denominator at ``width`` (nan where either is missing or the denominator is not positive)."""
    if width in numerator and width in denominator and denominator[width] > 0:
        return numerator[width] / denominator[width]
    return math.nan


def scipy_round_share(width: int, ours: Series, scipy_: Series, round_lap: Series, official: Series) -> float:
    """scipy's estimated share of an official-length round: the round's assignment seconds scaled by scipy/ours
    on the un-align matrices (nan where a piece is missing)."""
    if not (width in round_lap and width in official and width in ours and width in scipy_ and ours[width] > 0):
        return math.nan
    estimate = round_lap[width] * scipy_[width] / ours[width]
    return estimate / (official[width] - round_lap[width] + estimate)


def lap_shares(rows: Sequence[Row], family: str, config: ScalingConfig) -> list[dict[str, Any]]:
    """Per width: the LAP (ours, scipy) against the statistics pass, one curve epoch, and the round."""
    ours, scipy_ = series(rows, family, "lap_ours"), series(rows, family, "lap_scipy")
    stats_, epoch = series(rows, family, "stats"), curve_epoch(rows, family, config)
    round_, round_lap = series(rows, family, "round"), series(rows, family, "round_lap")
    official = official_round(rows, family, config)
    return [dict(width=w, ours_stats=ratio_at(w, ours, stats_), scipy_stats=ratio_at(w, scipy_, stats_),
                 ours_epoch=ratio_at(w, ours, epoch), scipy_epoch=ratio_at(w, scipy_, epoch),
                 round_share=ratio_at(w, round_lap, round_), official_share=ratio_at(w, round_lap, official),
                 official_share_scipy=scipy_round_share(w, ours, scipy_, round_lap, official))
            for w in sorted(set(ours) | set(stats_))]


def measured_crossing(widths: Sequence[int], above: Sequence[bool]) -> str:
    """The width from which on the ratio stays at or above the threshold, when the largest width is above it."""
    first = len(above)
    while first > 0 and above[first - 1]:
        first -= 1
    return f"<= {widths[0]}" if first == 0 else f"{widths[first]}"


def crossing(numerator: Series, denominator: Series, threshold: float) -> str:
    """The width from which on numerator / denominator stays at or above ``threshold``: a measured width, or, when
    the largest measured width is still below it, one extrapolated from the two series' power laws (fitted over
    their largest widths, at most ``EXTRAPOLATE_LIMIT`` times beyond the sweep)."""
    shared = sorted(set(numerator) & set(denominator))
    if not shared:
        return "n/a"
    above = [numerator[w] / denominator[w] >= threshold for w in shared]
    if above[-1]:
        return measured_crossing(shared, above)
    k1, c1 = fit_series(numerator, TOP_FIT)
    k2, c2 = fit_series(denominator, TOP_FIT)
    if not all(math.isfinite(v) for v in (k1, c1, k2, c2)) or k1 <= k2:
        return "not reached (ratio does not grow)"
    log_w = math.log(threshold * c2 / c1) / (k1 - k2)   # in logs: a slowly growing ratio would overflow
    last = shared[-1]
    if log_w > math.log(EXTRAPOLATE_LIMIT * last):
        return f"not reached (beyond {EXTRAPOLATE_LIMIT}x the largest width)"
    if log_w <= math.log(last):   # the fits disagree with the last measurement: say what was measured
        return f"> {last} ({format_percent(numerator[last] / denominator[last])} at {last})"
    w_star = math.exp(log_w)
    return f"~{w_star:,.0f} (extrapolated)" if w_star >= 10 else f"~{w_star:.2g} (extrapolated)"
