"""tsc_fast.assign and the native Jonker-Volgenant solver, checked against scipy.optimize.linear_sum_assignment."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from tsc_fast import _jv, assign

INFEASIBLE = "infeasible"


def scipy_total(cost, maximize=False):
    """scipy's optimum, or None when scipy finds the matrix infeasible."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return 0.0
    try:
        rows, cols = linear_sum_assignment(cost, maximize=maximize)
    except ValueError:
        return None
    return float(cost[rows, cols].sum())


def assert_optimal(cost, perm, maximize=False):
    """perm is a valid assignment of cost whose total equals scipy's optimum (relative 1e-12)."""
    cost64 = np.asarray(cost, dtype=np.float64)
    n_rows, n_cols = cost64.shape
    assert perm.dtype == np.int64 and perm.shape == (n_rows,)
    assigned = perm[perm >= 0]
    assert assigned.size == min(n_rows, n_cols)
    assert np.unique(assigned).size == assigned.size
    assert assigned.size == 0 or assigned.max() < n_cols
    expected = scipy_total(cost64, maximize)
    assert expected is not None
    total = assign.assignment_cost(cost64, perm)
    assert total == pytest.approx(expected, rel=1e-12, abs=1e-300)


# ---- random matrices ----

@st.composite
def cost_matrices(draw, max_side=40):
    n_rows = draw(st.integers(0, max_side))
    n_cols = draw(st.integers(0, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["uniform", "integers", "ties", "equal", "offset", "forbidden"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_cols)
    if kind == "uniform":
        cost = rng.standard_normal(shape)
    elif kind == "integers":
        cost = rng.integers(-50, 50, shape).astype(float)
    elif kind == "ties":
        cost = rng.integers(0, 3, shape).astype(float)
    elif kind == "equal":
        cost = np.full(shape, 2.5)
    elif kind == "offset":
        cost = 1000.0 + rng.random(shape)
    else:
        cost = rng.random(shape)
        cost[rng.random(shape) < draw(st.floats(0.0, 0.8))] = np.inf
    return cost.astype(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cost=cost_matrices(), maximize=st.booleans())
def test_matches_scipy_on_random_matrices(cost, maximize):
    if maximize:
        cost = -cost   # forbidden pairs are -inf when maximising
    expected = scipy_total(cost, maximize)
    if expected is None:
        with pytest.raises(ValueError, match=INFEASIBLE):
            assign.solve(cost, maximize=maximize)
        return
    assert_optimal(cost, assign.solve(cost, maximize=maximize), maximize)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cost=cost_matrices(max_side=12), maximize=st.booleans(), candidates=st.integers(1, 3))
def test_candidate_phase_on_small_matrices(cost, maximize, candidates):
    """The candidate-edge phase (normally from 256 columns on) with very few candidates, so that its
    verification, its re-rounds, the rectangular column reset and the dense fallback all get exercised."""
    if maximize:
        cost = -cost
    expected = scipy_total(cost, maximize)
    if expected is None:
        with pytest.raises(ValueError, match=INFEASIBLE):
            _jv.solve(cost, maximize, sparse_min_cols=1, candidates=candidates)
        return
    assert_optimal(cost, _jv.solve(cost, maximize, sparse_min_cols=1, candidates=candidates), maximize)


def correlation_like(rng, n_rows, n_cols, kind):
    """Costs shaped like TSC's: low-rank feature correlations plus estimation noise."""
    loadings = rng.standard_normal((8, max(n_rows, n_cols))) / np.sqrt(8)
    corr = loadings[:, :n_rows].T @ loadings[:, :n_cols]
    corr /= np.abs(corr).max()
    corr += rng.standard_normal((n_rows, n_cols)) * 0.02
    if kind == "near_tie":
        corr = rng.standard_normal((n_rows, n_cols)) * 0.01
        rows = rng.choice(n_rows, n_rows // 2, replace=False)
        corr[rows, rng.integers(0, n_cols, rows.size)] += 0.1
    return corr


@pytest.mark.parametrize("shape", [(300, 300), (280, 420), (420, 280)])
@pytest.mark.parametrize("kind", ["unalign", "near_tie"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_scipy_on_large_correlation_matrices(shape, kind, dtype):
    rng = np.random.default_rng(sum(shape) + len(kind))
    cost = correlation_like(rng, *shape, kind).astype(dtype)
    assert_optimal(cost, assign.solve(cost))
    assert_optimal(cost, assign.solve(cost, maximize=True), maximize=True)
    # the candidate-edge phase, which the default only uses from 1024 columns on
    assert_optimal(cost, _jv.solve(cost, False, sparse_min_cols=1))
    assert_optimal(cost, _jv.solve(cost, True, sparse_min_cols=1), maximize=True)


def test_dense_and_candidate_phases_agree_at_size():
    cost = correlation_like(np.random.default_rng(7), 300, 300, "unalign")
    dense = _jv.solve(cost, False, sparse_min_cols=10**9)
    with_candidates = _jv.solve(cost, False, sparse_min_cols=1)
    assert assign.assignment_cost(cost, dense) == pytest.approx(assign.assignment_cost(cost, with_candidates),
                                                                rel=1e-12)
    assert_optimal(cost, dense)


# ---- shapes, layouts, dtypes, containers ----

@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
@pytest.mark.parametrize("shape, expected", [((0, 0), []), ((0, 4), []), ((3, 0), [-1, -1, -1])])
def test_empty_matrices(backend, shape, expected):
    perm = assign.solve(np.zeros(shape), backend=backend)
    assert perm.dtype == np.int64 and perm.tolist() == expected


def test_layouts_and_containers_give_the_optimum(rng):
    base = rng.standard_normal((37, 53))
    views = {
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "reversed": base[::-1, ::-1],
        "sliced": np.asfortranarray(rng.standard_normal((80, 120)))[::2, 1::3],
        "broadcast": np.broadcast_to(rng.random(41), (29, 41)),
        "big_endian": base.astype(">f8"),
        "float16": base.astype(np.float16),
        "int": (base * 10).astype(np.int32),
        "bool": base > 0,
        "list": base[:9, :7].tolist(),
        "readonly_f32": np.require(base.astype(np.float32), requirements=["W"]),
    }
    views["readonly_f32"].flags.writeable = False
    for name, cost in views.items():
        matrix = np.asarray(cost, dtype=np.float64)
        perm = assign.solve(cost)
        assert_optimal(matrix, perm)


def test_torch_tensors(rng):
    base = rng.standard_normal((25, 31))
    tensors = [torch.tensor(base), torch.tensor(base, dtype=torch.float32, requires_grad=True),
               torch.tensor(base).T, torch.tensor(base, dtype=torch.bfloat16), torch.tensor(base * 5).int()]
    for tensor in tensors:
        expected = tensor.detach().double().numpy()
        assert_optimal(expected, assign.solve(tensor))
        assert_optimal(expected, assign.solve(tensor, maximize=True), maximize=True)
    stack = torch.tensor(rng.standard_normal((3, 10, 10)))
    for cost, perm in zip(stack, assign.solve_many(stack, threads=2)):
        assert_optimal(cost.numpy(), perm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_is_copied_to_cpu(rng):
    cost = torch.tensor(rng.standard_normal((20, 20)), device="cuda")
    assert_optimal(cost.cpu().numpy(), assign.solve(cost))


def test_float32_is_solved_in_its_own_precision():
    # Entries that differ only in float32 rounding: the answer must be optimal for the float32 values.
    rng = np.random.default_rng(3)
    cost = (1.0 + rng.random((60, 60)) * 1e-6).astype(np.float32)
    assert_optimal(cost, assign.solve(cost))


# ---- magnitudes and structured matrices ----

@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1e-5, 1.0, 1e6, 1e12])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_magnitudes(scale, dtype):
    if dtype is np.float32 and not 1e-30 < scale < 1e30:
        pytest.skip("outside float32's range")
    rng = np.random.default_rng(int(np.log10(scale)) + 400)
    for shape in [(40, 40), (300, 300), (30, 50)]:
        cost = (rng.random(shape) * scale).astype(dtype)
        assert_optimal(cost, assign.solve(cost))


def test_offsets_and_mixed_signs():
    rng = np.random.default_rng(11)
    for cost in [1000.0 + rng.random((300, 300)), rng.standard_normal((300, 300)) * 1e3 - 5e2,
                 1e9 + rng.integers(0, 5, (200, 200)).astype(float)]:
        assert_optimal(cost, assign.solve(cost))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_additive_matrix_at_1000(dtype):
    # c[i, j] = a[i] + b[j]: every assignment is optimal up to rounding, which classic codes chase for seconds.
    rng = np.random.default_rng(5)
    cost = (rng.random(1000)[:, None] + rng.random(1000)[None, :]).astype(dtype)
    assert_optimal(cost, assign.solve(cost))


@pytest.mark.parametrize("n", [1000, 1001])
def test_all_equal_matrix_at_1000(n):
    cost = np.full((n, n), 0.75, dtype=np.float32)
    perm = assign.solve(cost)
    assert sorted(perm.tolist()) == list(range(n))
    assert assign.assignment_cost(cost, perm) == 0.75 * n


def test_maximize_is_minimize_of_the_negation(rng):
    cost = rng.standard_normal((45, 60))
    assert assign.assignment_cost(cost, assign.solve(cost, maximize=True)) == pytest.approx(
        -assign.assignment_cost(-cost, assign.solve(-cost)), rel=1e-12)


# ---- termination on rounding ties ----

# Built by a random search over 3x3 and 4x4 matrices mixing small integers with 1e17 (where a double's
# spacing is 16): classic JV (column reduction, reduction transfer, then augmenting row reduction that
# re-examines an evicted row whenever its best reduced cost is strictly below its second best) never ends
# on it, because lowering v[j] = 1e17 by 2 rounds back to 1e17 and the two identical rows evict each other
# forever. naive_arr_steps below is that classic loop; the test first confirms it cycles.
CYCLING = np.array([[0.0, 1e17, 2.0],
                    [2.0, 1e17, 1e17],
                    [2.0, 1e17, 1e17]])


def naive_arr_steps(cost, cap=10_000):
    n = cost.shape[0]
    v = cost.min(axis=0)
    x, y = np.full(n, -1), np.full(n, -1)
    wins = np.zeros(n, int)
    for j in range(n - 1, -1, -1):
        i = cost[:, j].argmin()
        wins[i] += 1
        if wins[i] == 1:
            x[i], y[j] = j, i
    free = []
    for i in range(n):
        if wins[i] == 0:
            free.append(i)
        elif wins[i] == 1:
            reduced = cost[i] - v
            reduced[x[i]] = np.inf
            v[x[i]] -= reduced.min()
    steps = 0
    for _ in range(2):
        k, deferred = 0, []
        while k < len(free):
            i = free[k]
            k += 1
            steps += 1
            if steps >= cap:
                return steps
            reduced = cost[i] - v
            j1, j2 = np.argsort(reduced, kind="stable")[:2]
            u1, u2 = reduced[j1], reduced[j2]
            evicted = y[j1]
            if u1 < u2:
                v[j1] -= u2 - u1
            elif evicted >= 0:
                j1, evicted = j2, y[j2]
            if evicted >= 0:
                x[evicted] = -1
                if u1 < u2:
                    k -= 1
                    free[k] = evicted
                else:
                    deferred.append(evicted)
            x[i], y[j1] = j1, i
        free = deferred
    return steps


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_cycle_of_classic_arr_terminates_with_the_optimum(dtype):
    cost = CYCLING.astype(dtype)
    assert naive_arr_steps(cost.astype(np.float64)) >= 10_000   # the classic loop does cycle here
    for backend in ["native", "scipy"]:
        assert_optimal(cost, assign.solve(cost, backend=backend))
    assert_optimal(cost, _jv.solve(cost, False, sparse_min_cols=1, candidates=1))
    big = np.kron(np.eye(100), cost.astype(np.float64)) + np.kron(1 - np.eye(100), np.full((3, 3), 3e17))
    assert_optimal(big, assign.solve(big))


# ---- errors ----

@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_invalid_entries_are_named(backend):
    cost = np.zeros((4, 5))
    cost[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"cost\[2, 3\] is nan"):
        assign.solve(cost, backend=backend)
    cost[2, 3] = -np.inf
    with pytest.raises(ValueError, match=r"cost\[2, 3\] is -inf.*minimising"):
        assign.solve(cost, backend=backend)
    cost[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"cost\[2, 3\] is inf.*maximising"):
        assign.solve(cost, maximize=True, backend=backend)
    several = np.asfortranarray(np.zeros((5, 5)))
    several[3, 0] = several[1, 4] = np.nan   # the first in row-major order is named, whatever the layout
    with pytest.raises(ValueError, match=r"cost\[1, 4\] is nan"):
        assign.solve(several, backend=backend)
    cost32 = np.zeros((3, 3), np.float32)
    cost32[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"cost\[0, 1\]"):
        assign.solve(cost32.T, backend=backend)


@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_infeasible_matrices(backend):
    inf = np.inf
    for cost, maximize in [
        (np.array([[inf, inf], [1.0, 2.0]]), False),            # a row with no allowed column
        (np.array([[inf, 1.0], [inf, 2.0]]), False),            # a column no row may take
        (np.array([[1.0, inf, inf], [2.0, inf, inf], [3.0, 4.0, 5.0]]), False),   # two rows, one column
        (np.array([[-inf, 1.0], [-inf, 2.0]]), True),           # maximising: -inf is forbidden
        (np.full((3, 5), inf), False),
    ]:
        with pytest.raises(ValueError, match=INFEASIBLE):
            assign.solve(cost, maximize=maximize, backend=backend)
    feasible = np.array([[inf, 1.0], [2.0, inf]])
    assert assign.solve(feasible, backend=backend).tolist() == [1, 0]


@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_bad_shapes_and_types(backend):
    for cost in [np.zeros(3), np.zeros((2, 2, 2)), np.float64(1.0)]:
        with pytest.raises(ValueError, match="2-D"):
            assign.solve(cost, backend=backend)
    with pytest.raises(TypeError, match="real"):
        assign.solve(np.zeros((2, 2), complex), backend=backend)
    with pytest.raises(TypeError, match="numeric"):
        assign.solve([["a", "b"], ["c", "d"]], backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        assign.solve(np.zeros((2, 2)), backend="fast")
    for threads in [0, -1, 1.5, "2", True]:
        with pytest.raises(ValueError, match="threads"):
            assign.solve_many([np.zeros((2, 2))], threads=threads)
    with pytest.raises(ValueError, match=r"costs\[1\]: cost must be a 2-D"):
        assign.solve_many([np.zeros((2, 2)), np.zeros(2)])
    with pytest.raises(ValueError, match=r"costs\[2\]: cost\[0, 0\] is nan"):
        assign.solve_many([np.zeros((2, 2)), np.zeros((2, 2)), np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match=r"costs\[1\]: cost matrix is infeasible"):
        assign.solve_many([np.zeros((2, 2)), np.full((2, 2), np.inf)], threads=2)


def test_assignment_cost_checks_the_permutation():
    cost = np.arange(12.0).reshape(3, 4)
    assert assign.assignment_cost(cost, np.array([3, 0, 1])) == 3.0 + 4.0 + 9.0
    assert assign.assignment_cost(cost.T, np.array([1, -1, 0, 2])) == 4.0 + 2.0 + 11.0
    for perm, message in [([0, 1], "one entry per row"), ([0, 0, 1], "more than one row"),
                          ([0, 1, 4], "outside"), ([0, 1, -2], "outside"), ([0.0, 1.0, 2.0], "integer")]:
        with pytest.raises(ValueError, match=message):
            assign.assignment_cost(cost, np.array(perm))


# ---- backends and threads ----

@settings(max_examples=40, deadline=None)
@given(cost=cost_matrices(max_side=25), maximize=st.booleans())
def test_backends_agree(cost, maximize):
    if maximize:
        cost = -cost
    results = {}
    for backend in ["native", "scipy", "lap"]:
        try:
            results[backend] = assign.assignment_cost(cost, assign.solve(cost, maximize, backend))
        except ValueError as error:
            results[backend] = str(error)
    assert isinstance(results["native"], str) == isinstance(results["scipy"], str) == isinstance(results["lap"], str)
    if isinstance(results["native"], str):
        assert results["native"] == results["scipy"] == results["lap"]
    else:
        assert results["scipy"] == pytest.approx(results["native"], rel=1e-12, abs=1e-300)
        assert results["lap"] == pytest.approx(results["native"], rel=1e-9, abs=1e-300)


def test_solve_many_on_threads_equals_sequential_solves(rng):
    costs = []
    for k in range(24):
        shape = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        cost = rng.standard_normal(shape).astype([np.float32, np.float64][k % 2])
        costs.append(cost if k % 3 else np.asfortranarray(cost))
    sequential = [assign.solve(cost) for cost in costs]
    for threads in [None, 1, 3, 8, 64]:
        parallel = assign.solve_many(costs, threads=threads)
        assert len(parallel) == len(costs)
        for got, want in zip(parallel, sequential):
            np.testing.assert_array_equal(got, want)
    for backend in ["scipy", "lap"]:
        totals = [assign.assignment_cost(c, p) for c, p in zip(costs, assign.solve_many(costs, backend=backend))]
        assert totals == pytest.approx([assign.assignment_cost(c, p) for c, p in zip(costs, sequential)],
                                       rel=1e-9)
    assert assign.solve_many([]) == []


# ---- settings are checked, never coerced ----

@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_maximize_must_be_a_bool(backend):
    cost = np.arange(9.0).reshape(3, 3) * np.array([1.0, 2.0, 3.0])
    for bad in ["no", "False", 1, 0, 1.0, None, np.array(True), [True]]:
        with pytest.raises(ValueError, match=r"maximize must be True or False, got"):
            assign.solve(cost, maximize=bad, backend=backend)
        with pytest.raises(ValueError, match=r"maximize must be True or False, got"):
            assign.solve_many([cost], maximize=bad, backend=backend)
    assert assign.solve(cost, maximize=np.True_, backend=backend).tolist() == \
        assign.solve(cost, maximize=True, backend=backend).tolist()
    assert assign.solve(cost, maximize=np.False_, backend=backend).tolist() == \
        assign.solve(cost, maximize=False, backend=backend).tolist()


def test_threads_must_be_in_range():
    for bad in [2**70, assign.MAX_THREADS + 1, np.int64(-3), 0, True, 2.0]:
        with pytest.raises(ValueError, match=rf"threads must be an integer in \[1, {assign.MAX_THREADS}\] or None"):
            assign.solve_many([np.zeros((2, 2))], threads=bad)
    assert [p.tolist() for p in assign.solve_many([1 - np.eye(2)], threads=np.int64(2))] == [[0, 1]]
    assert [p.tolist() for p in assign.solve_many([1 - np.eye(2)], threads=assign.MAX_THREADS)] == [[0, 1]]


# ---- size limit ----

HUGE = (10**6, 10**6)   # 10^12 entries: a broadcast view of it takes no memory, solving it would never end


class _GuardedSolver:
    """Stands in for the native module: its functions (solves, entry checks) run as usual, but fail the test
    when handed a matrix over the default size limit (or a list holding one)."""

    def __getattr__(self, name):
        real = getattr(_jv, name)
        if not callable(real):
            return real

        def guarded(*args, **kwargs):
            arrays = [a for arg in args for a in (arg if isinstance(arg, list) else [arg]) if hasattr(a, "size")]
            if any(a.size > assign.DEFAULT_MAX_ENTRIES for a in arrays):
                raise AssertionError(f"_jv.{name} was handed a matrix over the size limit")
            return real(*args, **kwargs)
        return guarded


@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_huge_matrices_are_refused_at_once(backend, monkeypatch):
    # refused before any copy (converting a 10^12-entry view would need terabytes: MemoryError, not this error)
    # and before any solve or entry check (every backend goes through _jv first, replaced here)
    monkeypatch.setattr(assign, "_jv", _GuardedSolver())
    # integer and float broadcast views (an integer one would be copied to float64 first), and a torch view
    for cost in [np.broadcast_to(np.int8(1), HUGE), np.broadcast_to(np.float32(1.0), HUGE),
                 torch.zeros((1, 1), dtype=torch.int32).expand(*HUGE)]:
        with pytest.raises(assign.MatrixTooLargeError) as raised:
            assign.solve(cost, backend=backend)
        message = str(raised.value)
        for part in ["1000000 x 1000000 = 1,000,000,000,000 entries", f"{assign.DEFAULT_MAX_ENTRIES:,}",
                     "(the default)", "max_entries=None", assign.MAX_ENTRIES_ENV]:
            assert part in message
        with pytest.raises(assign.MatrixTooLargeError, match=r"^costs\[1\]: cost matrix of 1000000 x 1000000"):
            assign.solve_many([np.zeros((2, 2)), cost], backend=backend)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("backend", ["native", "scipy", "lap"])
def test_max_entries_overrides_the_limit(backend, monkeypatch):
    monkeypatch.delenv(assign.MAX_ENTRIES_ENV, raising=False)
    cost = 1 - np.eye(10)   # the identity is the one optimum
    with pytest.raises(assign.MatrixTooLargeError, match=r"10 x 10 = 100 entries .* limit of 99 entries \(max_entries\)"):
        assign.solve(cost, backend=backend, max_entries=99)
    with pytest.raises(assign.MatrixTooLargeError, match=r"costs\[2\]: cost matrix of 10 x 10"):
        assign.solve_many([np.eye(3), np.eye(9), cost], backend=backend, max_entries=99)
    assert assign.solve(cost, backend=backend, max_entries=100).tolist() == list(range(10))
    assert assign.solve(cost, backend=backend, max_entries=np.int64(100)).tolist() == list(range(10))
    assert assign.solve(cost, backend=backend, max_entries=None).tolist() == list(range(10))
    for bad in [0, -1, 1.5, True, "100", 1e9]:
        with pytest.raises(ValueError, match=r"max_entries must be an integer >= 1"):
            assign.solve(cost, backend=backend, max_entries=bad)
    # the environment variable sets the limit where max_entries is left out; max_entries beats it
    monkeypatch.setenv(assign.MAX_ENTRIES_ENV, "50")
    with pytest.raises(assign.MatrixTooLargeError, match=rf"limit of 50 entries \(set by .*{assign.MAX_ENTRIES_ENV}\)"):
        assign.solve(cost, backend=backend)
    with pytest.raises(assign.MatrixTooLargeError, match=r"costs\[0\]"):
        assign.solve_many([cost], backend=backend)
    assert assign.solve(cost, backend=backend, max_entries=None).tolist() == list(range(10))
    assert assign.solve(1 - np.eye(7), backend=backend).tolist() == list(range(7))
    for text in ["none", " None "]:
        monkeypatch.setenv(assign.MAX_ENTRIES_ENV, text)
        assert assign.solve(cost, backend=backend).tolist() == list(range(10))
    for text in ["lots", "0", "-5", "1e9"]:
        monkeypatch.setenv(assign.MAX_ENTRIES_ENV, text)
        with pytest.raises(ValueError, match=rf"{assign.MAX_ENTRIES_ENV} must be a positive integer"):
            assign.solve(cost, backend=backend)


# ---- one source for the solver's messages ----

def test_every_backend_raises_the_solvers_own_messages():
    assert assign.INFEASIBLE_MESSAGE == _jv.INFEASIBLE_MESSAGE
    cases = [(np.array([[np.inf, np.inf], [1.0, 2.0]]), False), (np.array([[0.0, np.nan], [1.0, 2.0]]), False),
             (np.array([[0.0, 1.0], [-np.inf, 2.0]], np.float32), False), (np.array([[0.0, 1.0, np.inf]]), True)]
    for cost, maximize in cases:
        messages = set()
        for backend in ["native", "scipy", "lap"]:
            with pytest.raises(ValueError) as raised:
                assign.solve(cost, maximize=maximize, backend=backend)
            messages.add(str(raised.value))
        assert len(messages) == 1, messages


# ---- signals during a native solve ----

def slow_matrix(n):
    """c[i, j] = i * j: JV needs about n^3 / 2.5e9 s on it here (3000: ~11 s; random costs take ~0.03 s)."""
    index = np.arange(n, dtype=np.float32)
    return index[:, None] * index[None, :]


SLOW_SIDE = 3000   # float32, 36 MB; exact in float32 (i * j < 2**24)

# Runs in a fresh interpreter: imports tsc_fast.assign without tsc_fast/__init__ (which imports torch, seconds
# on a busy machine), says "solving", then solves slow matrices until interrupted.
INTERRUPTED_CHILD = textwrap.dedent("""
    import sys, time, types
    package = types.ModuleType("tsc_fast")
    package.__path__ = [sys.argv[1]]
    sys.modules["tsc_fast"] = package
    import numpy as np
    from tsc_fast import assign
    mode, n = sys.argv[2], int(sys.argv[3])
    index = np.arange(n, dtype=np.float32)
    cost = index[:, None] * index[None, :]
    print("solving", flush=True)
    start = time.perf_counter()
    try:
        if mode == "solve":
            assign.solve(cost)
        elif mode == "many":
            assign.solve_many([cost, cost.copy()], threads=2)
        else:   # one tiny, one slow: either thread may get the slow one, the other waits
            assign.solve_many([cost[:3, :3], cost], threads=2)
    except KeyboardInterrupt:
        print(f"interrupted after {time.perf_counter() - start:.3f} s", flush=True)
        raise
    print("finished", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("mode", ["solve", "many", "many_tiny_first"])
def test_ctrl_c_stops_a_long_native_solve(mode):
    """SIGINT during a solve that would take ~11 s here (and seconds on any machine) ends it with
    KeyboardInterrupt at once; on solve_many's threads it stops every thread (else the call would wait for the
    other matrix). The bounds are generous robustness bounds, not speed claims."""
    package = os.path.dirname(assign.__file__)
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_CHILD, package, mode, str(SLOW_SIDE)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, child.kill)   # a child stuck before "solving" must not hang the suite
    watchdog.start()
    try:
        assert child.stdout.readline().strip() == "solving", child.stderr.read()
        time.sleep(0.3)   # let it get into the solve
        interrupted_at = time.perf_counter()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
        after_signal = time.perf_counter() - interrupted_at
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert "KeyboardInterrupt" in err and "interrupted after" in out and "finished" not in out, (out, err)
    assert child.returncode != 0
    assert after_signal < 4.0, f"the solve went on for {after_signal:.1f} s after SIGINT"


needs_itimer = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")


class Alarm(Exception):
    pass


@needs_itimer
def test_a_raising_signal_handler_stops_the_solve_and_its_exception_propagates():
    cost = slow_matrix(SLOW_SIDE)

    def handler(signum, frame):
        raise Alarm("timer")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.perf_counter()
        with pytest.raises(Alarm):
            assign.solve(cost)
        assert time.perf_counter() - start < 4.0   # robustness bound: uninterrupted, ~11 s here
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Alarm):
            assign.solve_many([cost, cost], threads=2)
        assert time.perf_counter() - start < 8.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # the module is left usable
    small = slow_matrix(50)
    assert assign.solve(small).tolist() == list(range(49, -1, -1))


@needs_itimer
def test_signal_handlers_that_return_let_the_solve_finish_optimally():
    n = 1200   # ~0.6 s here
    calls = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: calls.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        perm = assign.solve(slow_matrix(n))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert perm.tolist() == list(range(n - 1, -1, -1))   # the anti-diagonal is optimal for i * j
    # pending signals are coalesced: two or more calls mean the handler also ran inside the solve
    assert len(calls) >= 2
