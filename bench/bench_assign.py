"""Benchmark of tsc_fast.assign (our Jonker-Volgenant solver) against scipy, lap and lapx, on TSC-like costs.

    .venv/bin/python bench/bench_assign.py --quick            # n = 256, 1024: a minute
    nohup .venv/bin/python bench/bench_assign.py > /tmp/bench_assign.log 2>&1 &   # full grid, 20-30 minutes

Cases (each an n x n matrix, built cheaply from a rank-32 latent plus estimation noise of 5000 samples):
  align     cost = -corr(X_i, Y_j), Y a permuted, noisier copy of X (the re-align step of TSC)
  unalign   cost = +corr(X_i, X_j) of one feature set with a shared latent (the un-align step, minimised)
  near_tie  cost = -corr where only half the features have a weak partner; the rest is estimation noise
  uniform   U[0, 1)
  additive  a[i] + b[j]: every assignment optimal up to rounding (slow for classic codes)
in float32 and float64. Solvers, all on the same matrices in one run: ours (tsc_fast.assign.solve), scipy
(linear_sum_assignment), lap (lap.lapjv) and lapx's lapjvr. lapx shares lap's import name, so it runs in a
separate virtual environment (--lapx-python, default /tmp/lapx-venv/bin/python; skipped when missing) as a
subprocess on the same matrices saved to .npy. Each time is the median of --repeats runs (--small-repeats
for n <= 2048) of the solve alone
(CPU time of the solving process: the solvers are single-threaded, and CPU time is steadier than wall time
on a shared machine; wall time is recorded too). An anchor whose first run exceeds --slow-s seconds is run
once; anchors above --max-anchor-n (per case, see ANCHOR_CAPS) are skipped and shown as "-".

Also measured: extra memory of each solver beyond the input matrix (peak RSS of a fresh subprocess during the
solve minus its RSS just before, the peak being reset through /proc/self/clear_refs; Linux only), and
solve_many on 8 matrices of n=1024 with 2 threads against 1.
Results: a markdown table printed and written to bench/results/assign.md, rows appended to
bench/results/assign.csv (with machine info), the run's summary in bench/results/assign.json.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from tsc_fast import assign  # noqa: E402

RANK = 32
SAMPLES = 5000
CASES = ("align", "unalign", "near_tie", "uniform", "additive")
CORRELATION_CASES = ("align", "unalign", "near_tie")
SOLVERS = ("ours", "scipy", "lap", "lapx")
# Largest n at which each anchor runs by default, per case: scipy and lap need minutes on additive matrices
# beyond that (scipy: about 10 s at n=2048 and 75 s at n=4096 here).
ANCHOR_CAPS = {"additive": {"scipy": 2048, "lap": 2048, "lapx": 4096}}


# ---- cost matrices ----

def _loadings(rng, n):
    return rng.standard_normal((RANK, n)) / np.sqrt(RANK)


def _estimation_noise(rng, n):
    return rng.standard_normal((n, n)) / np.sqrt(SAMPLES)


def make_align(rng, n):
    """-corr(X_i, Y_j): feature j of Y is feature perm[j] of X plus noise; X_i = z.a_i + e_i."""
    a, private = _loadings(rng, n), 0.5 + rng.random(n)
    perm = rng.permutation(n)
    cov = a.T @ a[:, perm]
    cov[perm, np.arange(n)] += private[perm]
    var_x = (a * a).sum(0) + private
    var_y = var_x[perm] + 0.5
    corr = cov / np.sqrt(var_x)[:, None] / np.sqrt(var_y)[None, :]
    return -(corr + _estimation_noise(rng, n))


def make_unalign(rng, n):
    """+corr(X_i, X_j) of one feature set sharing a low-rank latent (un-align minimises it)."""
    a, private = _loadings(rng, n), 0.5 + rng.random(n)
    cov = a.T @ a
    cov[np.arange(n), np.arange(n)] += private
    std = np.sqrt((a * a).sum(0) + private)
    noise = _estimation_noise(rng, n)
    return cov / std[:, None] / std[None, :] + (noise + noise.T) / np.sqrt(2)


def make_near_tie(rng, n):
    """-corr where half the features have a weak partner (0.05-0.15) and the rest only estimation noise."""
    corr = _estimation_noise(rng, n)
    rows = rng.choice(n, n // 2, replace=False)
    corr[rows, rng.permutation(n)[: n // 2]] += 0.05 + 0.1 * rng.random(n // 2)
    return -corr


def make_uniform(rng, n):
    return rng.random((n, n))


def make_additive(rng, n):
    return rng.random(n)[:, None] + rng.random(n)[None, :]


MAKERS = {"align": make_align, "unalign": make_unalign, "near_tie": make_near_tie, "uniform": make_uniform,
          "additive": make_additive}


def make_cost(case, n, dtype):
    rng = np.random.default_rng([n, CASES.index(case)])
    return np.ascontiguousarray(MAKERS[case](rng, n), dtype=dtype)


# ---- solvers ----

def _solve_scipy(cost):
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(cost)[1]


def _solve_lap(cost):
    import lap
    return lap.lapjv(cost, return_cost=False)[0]


IN_PROCESS = {"ours": assign.solve, "scipy": _solve_scipy, "lap": _solve_lap}


def time_runs(solve, cost, repeats, slow_s):
    """Median CPU and wall seconds of solve(cost) over `repeats` runs (1 run if the first exceeds slow_s)."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = solve(cost)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        if wall[0] > slow_s:
            break
    return float(np.median(cpu)), float(np.median(wall)), len(cpu), np.asarray(result)


LAPX_RUNNER = r"""
import json, sys, time
import numpy as np
import lap
cost = np.load(sys.argv[1])
repeats, slow_s = int(sys.argv[2]), float(sys.argv[3])
cpu, wall = [], []
for _ in range(repeats):
    c0, w0 = time.process_time(), time.perf_counter()
    _, rows, cols = lap.lapjvr(cost)
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
    if wall[0] > slow_s:
        break
perm = np.full(cost.shape[0], -1)
perm[rows] = cols
print(json.dumps({"cpu": float(np.median(cpu)), "wall": float(np.median(wall)), "runs": len(cpu),
                  "perm": perm.tolist(), "version": lap.__version__}))
"""


def time_lapx(python, cost, repeats, slow_s, workdir):
    path = Path(workdir) / "cost.npy"
    np.save(path, cost)
    out = subprocess.run([python, "-c", LAPX_RUNNER, str(path), str(repeats), str(slow_s)], check=True,
                         capture_output=True, text=True)
    report = json.loads(out.stdout)
    return report["cpu"], report["wall"], report["runs"], np.asarray(report["perm"]), report["version"]


# ---- extra memory: peak RSS of a fresh process, after loading the matrix vs after solving ----

MEMORY_RUNNER = r"""
import sys
import numpy as np
solver = sys.argv[2]
cost = np.load(sys.argv[1])
if solver == "ours":
    from tsc_fast import assign
    solve = assign.solve
elif solver == "scipy":
    from scipy.optimize import linear_sum_assignment as solve
else:
    import lap
    solve = lambda c: lap.lapjv(c, return_cost=False)
solve(cost[:64, :64])   # first-call allocations out of the way
def high_water_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")   # resets the peak RSS to the current RSS (Linux >= 4.0)
before = high_water_kib()
solve(cost)
print((high_water_kib() - before) / 1024.0)   # MiB
"""


def extra_memory_mib(solver, cost, workdir):
    path = Path(workdir) / "memory.npy"
    np.save(path, cost)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", MEMORY_RUNNER, str(path), solver], check=True,
                         capture_output=True, text=True, env=env)
    return float(out.stdout.strip())


# ---- solve_many on threads ----

def bench_threads(repeats, n=1024, count=8, threads=2):
    """Wall seconds of solve_many on `count` matrices with 1 and with `threads` threads, interleaved. The
    minimum is reported next to the median: on a shared machine other processes take cores away, and the
    minimum is the run least disturbed."""
    costs = [make_cost("unalign", n, np.float32) + np.float32(0.01 * k) for k in range(count)]
    runs, cores_used = {1: [], threads: []}, []
    for _ in range(max(repeats, 5)):
        for t in runs:
            w0, c0 = time.perf_counter(), time.process_time()
            assign.solve_many(costs, threads=t)
            runs[t].append(time.perf_counter() - w0)
            if t == threads:   # CPU seconds per wall second: about `threads` when the machine lends the cores
                cores_used.append((time.process_time() - c0) / runs[t][-1])
    return {"n": n, "matrices": count, "threads": threads,
            "median_s": {t: float(np.median(v)) for t, v in runs.items()},
            "min_s": {t: float(min(v)) for t, v in runs.items()},
            "speedup_median": float(np.median(runs[1]) / np.median(runs[threads])),
            "speedup_min": float(min(runs[1]) / min(runs[threads])),
            "cores_obtained_median": float(np.median(cores_used))}


def ours_extra_bytes(n):
    """Upper estimate of our solver's working memory for an n x n matrix, from csrc/jv.cpp: about ten arrays
    of n doubles or ints (duals, assignment, distances, predecessors, heap, scratch) and, from n = 1024 on,
    up to 2 * 32 candidate edges of 16 bytes per row (the candidates and their extensions)."""
    candidates = 0 if n < 1024 else n * 2 * (16 if n < 4096 else 32) * 16
    return 10 * 8 * n + candidates


# ---- reporting ----

def machine_info(lapx_version):
    import lap
    import scipy

    from tsc_fast.testbed.machine import cpu_model

    cpu = cpu_model()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "lap": lap.__version__, "lapx": lapx_version or "", "commit": commit}


def geomean(values):
    values = [v for v in values if v and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def fmt(seconds):
    if seconds is None:
        return "-"
    return f"{seconds:.4f}" if seconds < 1 else f"{seconds:.2f}"


def ratio(anchor, ours):
    return None if anchor is None else anchor / ours


def markdown(rows, summary, machine):
    lines = [f"# Assignment solver benchmark ({machine['date']}, {machine['cpu']}, {machine['cores']} cores)",
             "", "Median CPU seconds of one solve; ratios are anchor / ours (> 1: ours is faster).", "",
             "| case | n | dtype | ours | scipy | lap | lapx lapjvr | scipy/ours | lap/ours | lapx/ours |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        ratios = [ratio(s.get(a), s["ours"]) for a in ("scipy", "lap", "lapx")]
        lines.append(f"| {r['case']} | {r['n']} | {r['dtype']} | {fmt(s['ours'])} | {fmt(s.get('scipy'))} | "
                     f"{fmt(s.get('lap'))} | {fmt(s.get('lapx'))} | "
                     + " | ".join("-" if q is None else f"{q:.2f}x" for q in ratios) + " |")
    lines += ["", "## Summary", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024,2048,4096,8192")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-repeats", type=int, default=7,
                        help="repeats for n <= 2048, where a solve takes milliseconds and noise is relatively larger")
    parser.add_argument("--slow-s", type=float, default=10.0, help="anchors slower than this run once")
    parser.add_argument("--max-anchor-n", type=int, default=None,
                        help="skip anchors above this n for every case (default: ANCHOR_CAPS only)")
    parser.add_argument("--lapx-python", default="/tmp/lapx-venv/bin/python")
    parser.add_argument("--memory-n", type=int, default=4096, help="n of the extra-memory measurement (0: skip)")
    parser.add_argument("--no-threads", action="store_true", help="skip the solve_many measurement")
    parser.add_argument("--quick", action="store_true", help="n = 256, 1024; memory at 1024")
    parser.add_argument("--tag", default="", help="label stored with the CSV rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.memory_n = "256,1024", min(args.memory_n, 1024)

    sizes = [int(s) for s in args.sizes.split(",")]
    cases = args.cases.split(",")
    dtypes = [np.dtype(d) for d in args.dtypes.split(",")]
    solvers = [s for s in args.solvers.split(",") if s in SOLVERS]
    use_lapx = "lapx" in solvers and Path(args.lapx_python).exists()
    if "lapx" in solvers and not use_lapx:
        print(f"lapx skipped: {args.lapx_python} not found (python3 -m venv /tmp/lapx-venv && "
              "/tmp/lapx-venv/bin/pip install lapx numpy)")
    RESULTS.mkdir(parents=True, exist_ok=True)

    rows, lapx_version = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for case in cases:
            for n in sizes:
                for dtype in dtypes:
                    cost = make_cost(case, n, dtype)
                    seconds, wall, runs, totals = {}, {}, {}, {}
                    repeats = max(args.repeats, args.small_repeats) if n <= 2048 else args.repeats
                    for solver in solvers:
                        cap = ANCHOR_CAPS.get(case, {}).get(solver)
                        if solver != "ours" and ((cap is not None and n > cap) or
                                                 (args.max_anchor_n is not None and n > args.max_anchor_n)):
                            continue
                        if solver == "lapx":
                            if not use_lapx:
                                continue
                            c, w, k, perm, lapx_version = time_lapx(args.lapx_python, cost, repeats, args.slow_s,
                                                                    workdir)
                        else:
                            c, w, k, perm = time_runs(IN_PROCESS[solver], cost, repeats, args.slow_s)
                        seconds[solver], wall[solver], runs[solver] = c, w, k
                        totals[solver] = float(cost.astype(np.float64)[np.arange(n), perm].sum())
                    if "scipy" in totals:   # ours must hit scipy's optimum
                        assert math.isclose(totals["ours"], totals["scipy"], rel_tol=1e-12, abs_tol=1e-9), \
                            (case, n, dtype, totals)
                    row = {"case": case, "n": n, "dtype": dtype.name, "seconds": seconds, "wall": wall,
                           "runs": runs, "totals": totals}
                    rows.append(row)
                    print(f"{case:9s} n={n:6d} {dtype.name:8s} " + "  ".join(
                        f"{s} {seconds[s]:.4f}s" + ("" if s == "ours" else f" ({seconds[s] / seconds['ours']:.2f}x)")
                        for s in seconds), flush=True)
                    del cost

        memory = {}
        if args.memory_n:
            for dtype in dtypes:
                cost = make_cost("unalign", args.memory_n, dtype)
                for solver in [s for s in solvers if s in IN_PROCESS]:
                    memory[f"{solver} {dtype.name}"] = extra_memory_mib(solver, cost, workdir)
                memory[f"input {dtype.name}"] = cost.nbytes / 2**20
                del cost
            memory["ours, estimate from the code"] = ours_extra_bytes(args.memory_n) / 2**20
    threads = None if args.no_threads else bench_threads(args.repeats)

    machine = machine_info(lapx_version)
    scipy_ratios = [r["seconds"]["scipy"] / r["seconds"]["ours"] for r in rows if "scipy" in r["seconds"]]
    summary = {
        "geometric-mean speedup over scipy": f"{geomean(scipy_ratios):.2f}x over {len(scipy_ratios)} cases",
        "slowest ratio vs scipy": min(((r["seconds"]["scipy"] / r["seconds"]["ours"], r["case"], r["n"], r["dtype"])
                                       for r in rows if "scipy" in r["seconds"]), default=None),
        "slowest ratio vs lap": min(((r["seconds"]["lap"] / r["seconds"]["ours"], r["case"], r["n"], r["dtype"])
                                     for r in rows if "lap" in r["seconds"]), default=None),
        "slowest ratio vs lapx on correlation cases": min(
            ((r["seconds"]["lapx"] / r["seconds"]["ours"], r["case"], r["n"], r["dtype"])
             for r in rows if "lapx" in r["seconds"] and r["case"] in CORRELATION_CASES), default=None),
        f"extra memory at n={args.memory_n} (MiB, peak RSS delta)": {k: round(v, 1) for k, v in memory.items()},
        "solve_many": threads,
    }
    report = markdown(rows, summary, machine)
    print(report)
    (RESULTS / "assign.md").write_text(report)
    (RESULTS / "assign.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows,
                                                     "summary": summary}, indent=1, default=str))
    csv_path = RESULTS / "assign.csv"
    fields = ["date", "commit", "cpu", "cores", "tag", "case", "n", "dtype", "solver", "cpu_s", "wall_s", "runs",
              "ratio_vs_ours", "total"]
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new_file:
            writer.writeheader()
        for r in rows:
            for solver, cpu_s in r["seconds"].items():
                writer.writerow({"date": machine["date"], "commit": machine["commit"], "cpu": machine["cpu"],
                                 "cores": machine["cores"], "tag": args.tag, "case": r["case"], "n": r["n"],
                                 "dtype": r["dtype"], "solver": solver, "cpu_s": f"{cpu_s:.6f}",
                                 "wall_s": f"{r['wall'][solver]:.6f}", "runs": r["runs"][solver],
                                 "ratio_vs_ours": f"{cpu_s / r['seconds']['ours']:.4f}",
                                 "total": repr(r["totals"][solver])})


if __name__ == "__main__":
    main()
