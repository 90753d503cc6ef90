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

Settings are checked, never coerced: ``maximize`` must be True or False (numpy bools too), ``threads`` None or
an integer in [1, MAX_THREADS], ``backend`` one of BACKENDS; anything else raises ValueError naming the setting.

Size limit: a matrix with more than ``max_entries`` entries (rows * cols) is refused at once with
:class:`MatrixTooLargeError`, before anything is copied or solved. Jonker-Volgenant reads every entry several
times and its worst case grows as rows^2 * cols: on this project's 2-core test machine an adversarial
float32 matrix c[i, j] = i * j takes about 3 s at 2000 x 2000 and 11 s at 3000 x 3000 (random costs of that
size: 0.03 s), so the default limit,
DEFAULT_MAX_ENTRIES = 2**30 (a 32768 x 32768 matrix: 4 GiB as float32, 8 GiB as float64, hours in the worst
case), is about as large as a solve can still be afforded, while the widest permutation groups of today's
models (~16k units, 2.7e8 entries) stay well inside; typical correlation costs solve far faster than the worst
case. ``max_entries=N`` raises or lowers it per call, ``max_entries=None`` removes it, and the environment
variable ``TSC_FAST_ASSIGN_MAX_ENTRIES`` (a positive integer, or ``none``) sets it for calls that leave
``max_entries`` out (e.g. the ones tsc_fast.align makes). It applies to every backend, and to each matrix of
``solve_many``. The native solver itself indexes rows and columns with 32 bits (at most 2**31 - 1 each).

Ctrl-C: the native solver runs without the GIL but looks for pending signals about every 50 ms (between its
phases and during long ones), so Ctrl-C stops a long ``solve`` or ``solve_many`` (all of its threads) with
KeyboardInterrupt, returning nothing. The scipy and lap backends cannot be interrupted inside a solve.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, NamedTuple, Optional

import numpy as np

from . import _jv, validate

__all__ = ["solve", "solve_many", "assignment_cost", "BACKENDS", "MatrixTooLargeError", "DEFAULT_MAX_ENTRIES",
           "MAX_ENTRIES_ENV", "MAX_THREADS"]

BACKENDS = ("auto", "native", "scipy", "lap")

# The solver's own words (defined once, in csrc/jv.hpp), raised by every backend.
INFEASIBLE_MESSAGE = _jv.INFEASIBLE_MESSAGE

DEFAULT_MAX_ENTRIES = 2**30            # rows * cols; see "Size limit" in the module docstring
MAX_ENTRIES_ENV = "TSC_FAST_ASSIGN_MAX_ENTRIES"
MAX_THREADS = 4096                     # solve_many's threads; more than there are matrices never start


class MatrixTooLargeError(ValueError):
    """A cost matrix over the size limit (max_entries); the message names its size, the limit and the override."""


class _FromEnvironment:
    """Default of max_entries: $TSC_FAST_ASSIGN_MAX_ENTRIES when set, else DEFAULT_MAX_ENTRIES."""

    def __repr__(self) -> str:
        return f"${MAX_ENTRIES_ENV} or {DEFAULT_MAX_ENTRIES}"


_LIMIT_FROM_ENV: Any = _FromEnvironment()


def solve(cost: Any, maximize: bool = False, backend: str = "auto", *,
          max_entries: int | None = _LIMIT_FROM_ENV) -> np.ndarray:
    """Optimal assignment of a 2-D cost matrix.

    Args:
        cost: 2-D array-like or torch tensor, shape (rows, cols); see the module docstring for dtypes,
            forbidden entries and rectangular shapes.
        maximize: True to maximise the summed cost instead of minimising it (a bool: True or False).
        backend: "auto" (= "native"), "native", "scipy" or "lap".
        max_entries: refuse matrices with more than this many entries (rows * cols); None: no limit.
            Default: $TSC_FAST_ASSIGN_MAX_ENTRIES if set, else DEFAULT_MAX_ENTRIES (2**30); see the module
            docstring for what a solve of that size costs.

    Returns:
        int64 array p of length rows: row i is assigned to column p[i], or p[i] == -1 when rows outnumber
        columns and row i is left out.

    Raises:
        ValueError: not 2-D, NaN or a disallowed infinity (the message names the entry), an infeasible
            matrix, or a setting outside what it accepts (maximize, backend, max_entries).
        MatrixTooLargeError (a ValueError): more than max_entries entries.
        TypeError: a cost that is not real-valued.
        KeyboardInterrupt: Ctrl-C during a native solve.
    """
    maximize = validate.boolean("maximize", maximize)
    solver = _backend(backend)
    limit = _entry_limit(max_entries)
    if solver is _solve_native:   # the native solver checks entries itself, during its first pass
        return _jv.solve(_as_float_matrix(cost, limit), maximize, check=True)
    return solver(_validated(cost, maximize, limit), maximize)


def solve_many(costs: Iterable[Any], maximize: bool = False, threads: Optional[int] = None,
               backend: str = "auto", *, max_entries: int | None = _LIMIT_FROM_ENV) -> List[np.ndarray]:
    """``solve`` for each matrix of ``costs`` (any shapes), in order.

    The native backend spreads the matrices over ``threads`` native threads (None: ``os.cpu_count()``; an
    integer in [1, MAX_THREADS] otherwise, and never more threads than matrices), without the GIL; the other
    backends solve them one after another. A 3-D array or tensor counts as a sequence of 2-D matrices.
    ``max_entries`` applies to each matrix, as in ``solve``. Errors name the offending matrix, e.g.
    ``costs[3]: cost matrix is infeasible``. Ctrl-C stops every thread and raises KeyboardInterrupt.
    """
    maximize = validate.boolean("maximize", maximize)
    solver = _backend(backend)
    thread_count = _thread_count(threads)
    limit = _entry_limit(max_entries)
    native = solver is _solve_native
    matrices = []
    for index, cost in enumerate(costs):
        try:
            matrices.append(_as_float_matrix(cost, limit) if native else _validated(cost, maximize, limit))
        except (ValueError, TypeError) as error:
            raise type(error)(f"costs[{index}]: {error}") from None
    if native:
        return list(_jv.solve_many(matrices, maximize, thread_count, check=True))
    results = []
    for index, matrix in enumerate(matrices):
        try:
            results.append(solver(matrix, maximize))
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

class _Limit(NamedTuple):
    entries: int | None      # None: no limit
    source: str              # where it came from, for the error message


_DEFAULT_LIMIT = _Limit(DEFAULT_MAX_ENTRIES, "the default")


def _entry_limit(max_entries: Any) -> _Limit:
    """The size limit from max_entries, or by default from the environment, else DEFAULT_MAX_ENTRIES."""
    if max_entries is _LIMIT_FROM_ENV:
        text = os.environ.get(MAX_ENTRIES_ENV, "").strip()   # read on every call, so that setting it works
        if not text:
            return _DEFAULT_LIMIT
        if text.lower() == "none":
            return _Limit(None, MAX_ENTRIES_ENV)
        try:
            limit = int(text)
        except ValueError:
            limit = 0
        if limit < 1:
            raise ValueError(f"environment variable {MAX_ENTRIES_ENV} must be a positive integer (the most "
                             f"entries a cost matrix may have) or 'none' (no limit), got {text!r}")
        return _Limit(limit, f"set by the environment variable {MAX_ENTRIES_ENV}")
    if max_entries is None:
        return _Limit(None, "max_entries")
    return _Limit(validate.integer("max_entries", max_entries, 1), "max_entries")


def _check_size(shape: tuple, limit: _Limit | None) -> None:
    """Refuses a 2-D shape with more than limit.entries entries, before the matrix is copied or solved."""
    if limit is None or limit.entries is None or len(shape) != 2:
        return
    rows, cols = shape
    entries = int(rows) * int(cols)   # Python ints: no overflow
    if entries <= limit.entries:
        return
    override = "pass a larger max_entries, or max_entries=None for no limit"
    if limit.source != "max_entries":   # the environment only applies where max_entries is left out
        override += f", or set the environment variable {MAX_ENTRIES_ENV} to a larger number or to none"
    raise MatrixTooLargeError(
        f"cost matrix of {rows} x {cols} = {entries:,} entries is over the size limit of {limit.entries:,} "
        f"entries ({limit.source}): the solver reads every entry several times, its worst-case time grows as "
        f"rows^2 * cols, and stored densely the matrix takes {_size_text(entries * 4)} as float32. To solve it "
        f"anyway, {override}")


def _size_text(n_bytes: int) -> str:
    for unit, scale in [("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)]:
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes} bytes"


def _to_numpy(value: Any, max_entries: _Limit | None = None) -> np.ndarray:
    """A numpy view of a torch tensor (moved to the CPU if needed), or np.asarray of anything else. A 2-D
    shape over the size limit raises MatrixTooLargeError before anything is copied."""
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        tensor = value.detach()
        _check_size(tuple(tensor.shape), max_entries)
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
    array = np.asarray(value)
    _check_size(array.shape, max_entries)
    return array


def _as_float_matrix(cost: Any, max_entries: _Limit | None = None) -> np.ndarray:
    """float32 or float64, 2-D, native byte order, strides the native solver can use; copies only if needed."""
    matrix = _to_numpy(cost, max_entries)
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


def _validated(cost: Any, maximize: bool, max_entries: _Limit | None = None) -> np.ndarray:
    """_as_float_matrix plus the entry check (NaN, disallowed infinity), raising the native solver's message."""
    matrix = _as_float_matrix(cost, max_entries)
    _jv.check_entries(matrix, maximize)
    return matrix


def _thread_count(threads: Any) -> int:
    if threads is None:
        return min(os.cpu_count() or 1, MAX_THREADS)
    return validate.integer("threads", threads, 1, MAX_THREADS, allow_none=True)


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
