"""Optimal linear assignment: which column should each row get so that the summed cost is smallest (or largest)?

    perm = tsc_fast.assign.solve(cost)                  # int64, row i -> column perm[i] (-1: left unassigned)
    perms = tsc_fast.assign.solve_many([c1, c2, c3])    # several matrices on native threads
    total = tsc_fast.assign.assignment_cost(cost, perm)

The default backend is our own C++ Jonker-Volgenant solver (``tsc_fast._jv``): exact, float32 and float64 read
in place (no float64 copy, no negated copy for ``maximize``, any strides), the GIL released while it runs.
``backend="scipy"`` (``scipy.optimize.linear_sum_assignment``) and ``backend="lap"`` (``lap.lapjv``) give the
same answers for cross-checking: every backend goes through the same input checks and raises the same errors.

Conventions, shared by all backends:

- ``cost`` is any 2-D array-like: a numpy array (any dtype that converts to float; float32/float64 are used as
  they are), a nested list, or a torch tensor (CPU tensors are read without a copy through ``.numpy()``;
  CUDA tensors are copied to the CPU first, since the solver runs on the CPU). torch is never imported here.
- Rectangular matrices are fine: with more rows than columns, ``min(rows, cols)`` rows get a column and the
  others get -1; with more columns, every row gets a column.
- Forbidden pairs: ``+inf`` when minimising, ``-inf`` when maximising (the value that can never win). The
  other infinity and NaN raise ValueError naming the entry. A matrix where every complete assignment needs a
  forbidden pair raises ValueError.
- Ties: any optimal assignment may be returned; backends may differ in which one, never in the total.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Optional

import numpy as np

from . import _jv

__all__ = ["solve", "solve_many", "assignment_cost", "BACKENDS"]

BACKENDS = ("auto", "native", "scipy", "lap")

INFEASIBLE_MESSAGE = "cost matrix is infeasible: every complete assignment uses a forbidden (infinite) entry"


def solve(cost: Any, maximize: bool = False, backend: str = "auto") -> np.ndarray:
    """Optimal assignment of a 2-D cost matrix.

    Args:
        cost: 2-D array-like or torch tensor, shape (rows, cols); see the module docstring for dtypes,
            forbidden entries and rectangular shapes.
        maximize: maximise the summed cost instead of minimising it.
        backend: "auto" (= "native"), "native", "scipy" or "lap".

    Returns:
        int64 array p of length rows: row i is assigned to column p[i], or p[i] == -1 when rows outnumber
        columns and row i is left out.

    Raises:
        ValueError: not 2-D, NaN or a disallowed infinity (the message names the entry), an infeasible
            matrix, or an unknown backend.
        TypeError: a cost that is not real-valued.
    """
    solver = _backend(backend)
    if solver is _solve_native:   # the native solver checks entries itself, during its first pass
        return _jv.solve(_as_float_matrix(cost), bool(maximize), check=True)
    return solver(_validated(cost, maximize), bool(maximize))


def solve_many(costs: Iterable[Any], maximize: bool = False, threads: Optional[int] = None,
               backend: str = "auto") -> List[np.ndarray]:
    """``solve`` for each matrix of ``costs`` (any shapes), in order.

    The native backend spreads the matrices over ``threads`` native threads (None: ``os.cpu_count()``),
    without the GIL; the other backends solve them one after another. A 3-D array or tensor counts as a
    sequence of 2-D matrices. Errors name the offending matrix, e.g. ``costs[3]: cost matrix is infeasible``.
    """
    solver = _backend(backend)
    thread_count = _thread_count(threads)
    native = solver is _solve_native
    matrices = []
    for index, cost in enumerate(costs):
        try:
            matrices.append(_as_float_matrix(cost) if native else _validated(cost, maximize))
        except (ValueError, TypeError) as error:
            raise type(error)(f"costs[{index}]: {error}") from None
    if native:
        return list(_jv.solve_many(matrices, bool(maximize), thread_count, check=True))
    results = []
    for index, matrix in enumerate(matrices):
        try:
            results.append(solver(matrix, bool(maximize)))
        except ValueError as error:
            raise ValueError(f"costs[{index}]: {error}") from None
    return results


def assignment_cost(cost: Any, perm: Any) -> float:
    """Summed cost of the pairs (i, perm[i]) with perm[i] >= 0, accumulated in float64.

    Raises ValueError when perm does not fit the matrix (wrong length, a column out of range, a column used
    twice).
    """
    matrix = _to_numpy(cost)
    if matrix.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {matrix.shape}")
    columns = np.asarray(_to_numpy(perm))
    if columns.ndim != 1 or columns.shape[0] != matrix.shape[0]:
        raise ValueError(f"perm must have one entry per row ({matrix.shape[0]}), got shape {columns.shape}")
    if columns.size and not np.issubdtype(columns.dtype, np.integer):
        raise ValueError(f"perm must hold integer column indices, got dtype {columns.dtype}")
    columns = columns.astype(np.int64, copy=False)
    if columns.size and (columns.min() < -1 or columns.max() >= matrix.shape[1]):
        raise ValueError(f"perm holds a column outside [-1, {matrix.shape[1]})")
    rows = np.flatnonzero(columns >= 0)
    if np.unique(columns[rows]).size != rows.size:
        raise ValueError("perm assigns some column to more than one row")
    return float(np.sum(matrix[rows, columns[rows]], dtype=np.float64))


# ---- input checks, shared by every backend (the native solver runs the entry check itself, in C++, with
# the same rule and message as _validated, so that it costs no extra pass over square matrices) ----

def _to_numpy(value: Any) -> np.ndarray:
    """A numpy view of a torch tensor (moved to the CPU if needed), or np.asarray of anything else."""
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if str(tensor.layout) != "torch.strided":
            tensor = tensor.to_dense()
        if tensor.is_complex():
            raise TypeError(f"cost must be real-valued, got {tensor.dtype}")
        tensor = tensor.resolve_conj().resolve_neg()
        if not tensor.is_floating_point():
            tensor = tensor.double()
        elif tensor.element_size() < 4:   # float16 / bfloat16: numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def _as_float_matrix(cost: Any) -> np.ndarray:
    """float32 or float64, 2-D, native byte order, strides the native solver can use; copies only if needed."""
    matrix = _to_numpy(cost)
    if matrix.dtype.kind == "c":
        raise TypeError(f"cost must be real-valued, got {matrix.dtype}")
    if matrix.dtype.kind not in "fiub":
        try:
            matrix = matrix.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"cost must be numeric, got dtype {matrix.dtype}") from None
    if matrix.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got a {matrix.ndim}-D array of shape {matrix.shape}")
    if matrix.dtype.kind in "iub" or matrix.dtype.itemsize > 8:
        matrix = matrix.astype(np.float64)   # integers and bool; long double
    elif matrix.dtype.itemsize < 4:
        matrix = matrix.astype(np.float32)   # float16
    if not matrix.dtype.isnative:
        matrix = matrix.astype(matrix.dtype.newbyteorder("="))
    if any(stride % matrix.itemsize for stride in matrix.strides):
        matrix = np.ascontiguousarray(matrix)
    return matrix


def _validated(cost: Any, maximize: bool) -> np.ndarray:
    """_as_float_matrix plus the entry check (NaN, disallowed infinity) with the native solver's message."""
    matrix = _as_float_matrix(cost)
    bad = _jv.find_invalid(matrix, bool(maximize))
    if bad is not None:
        row, col = bad
        banned = "NaN and +inf are not allowed when maximising (-inf marks a forbidden pair)" if maximize else \
            "NaN and -inf are not allowed when minimising (+inf marks a forbidden pair)"
        raise ValueError(f"cost[{row}, {col}] is {matrix[row, col]}: {banned}")
    return matrix


def _thread_count(threads: Optional[int]) -> int:
    if threads is None:
        return os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


# ---- backends: validated float32/float64 matrix in, int64 column per row out ----

def _solve_native(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    return _jv.solve(matrix, maximize)


def _solve_scipy(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    perm = np.full(matrix.shape[0], -1, dtype=np.int64)
    if matrix.size == 0:
        return perm
    try:
        rows, cols = linear_sum_assignment(matrix, maximize=maximize)
    except ValueError as error:
        if "infeasible" in str(error):
            raise ValueError(INFEASIBLE_MESSAGE) from None
        raise
    perm[rows] = cols
    return perm


def _solve_lap(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    try:
        import lap
    except ImportError:
        raise ModuleNotFoundError("backend='lap' needs the lap package: pip install lap") from None
    n_rows, n_cols = matrix.shape
    perm = np.full(n_rows, -1, dtype=np.int64)
    if matrix.size == 0:
        return perm
    work = -matrix.astype(np.float64) if maximize else matrix.astype(np.float64)
    forbidden = np.isposinf(work)
    allowed = work[~forbidden]
    if allowed.size == 0:
        raise ValueError(INFEASIBLE_MESSAGE)
    # lap.lapjv has no +inf and loses accuracy on large magnitudes: map the allowed costs onto [0, 1] (a shift
    # and a positive scale change no optimum, since every assignment has min(rows, cols) pairs) and replace
    # forbidden pairs by a cost that no optimum can afford while a feasible assignment exists.
    low, span = allowed.min(), allowed.max() - allowed.min()
    if span > 0:
        work = (work - low) / span
    else:
        work = np.zeros_like(work)
    work[forbidden] = min(n_rows, n_cols) + 2.0
    _, col_of_row, _ = lap.lapjv(work, extend_cost=n_rows != n_cols)
    col_of_row = np.asarray(col_of_row, dtype=np.int64)
    assigned = np.flatnonzero(col_of_row >= 0)
    if forbidden[assigned, col_of_row[assigned]].any():
        raise ValueError(INFEASIBLE_MESSAGE)
    perm[assigned] = col_of_row[assigned]
    return perm


_SOLVERS = {"auto": _solve_native, "native": _solve_native, "scipy": _solve_scipy, "lap": _solve_lap}


def _backend(name: str) -> Callable[[np.ndarray, bool], np.ndarray]:
    if not isinstance(name, str) or name not in _SOLVERS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return _SOLVERS[name]
