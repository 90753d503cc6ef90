"""The memory guard: a component runs only when its estimated peak fits into the memory available (and its
largest group is within the component's width cap), so a large sweep point is skipped with a note instead of
swapping or being killed."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

GIB = 2 ** 30


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
    statistics_bytes = int(sum(2 * s for s in squares) + 3 * max(squares, default=0))
    if component == "stats":
        return statistics_bytes
    if component in ("curve_step", "bn_recal"):
        return 10 * 4 * params
    if component in ("round", "round_lap"):
        return 16 * 4 * params + statistics_bytes
    if component == "lap_scipy":
        return 2 * max(squares, default=0)
    return 4 * params


def cap_reason(largest_group: int, cap: int | None) -> str:
    """Why a width cap excludes the point ("" when it does not)."""
    if cap is not None and largest_group > cap:
        return f"capped: largest group {largest_group} > {cap}"
    return ""


def memory_reason(component: str, params: int, group_sizes: Sequence[int], memory_fraction: float) -> str:
    """Why the component would not fit into ``memory_fraction`` of the available memory ("" when it would, or
    when the available memory is unknown)."""
    free = available_memory_bytes()
    need = estimated_peak_bytes(component, params, group_sizes)
    if free is not None and need > memory_fraction * free:
        return f"skipped: needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB available"
    return ""


def skip_reason(component: str, largest_group: int, params: int, group_sizes: Sequence[int], cap: int | None,
                memory_fraction: float) -> str:
    """Why the component should not run at this point ("" when it may): its width cap first, then memory."""
    return cap_reason(largest_group, cap) or memory_reason(component, params, group_sizes, memory_fraction)
