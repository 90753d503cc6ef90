"""The scaling study (``tsc-fast bench scaling``): power-law fits, the quick sweep's outputs, LAP agreement."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tsc_fast import assign
from tsc_fast.cli import main
from tsc_fast.figures import is_valid_png
from tsc_fast.spec import discover
from tsc_fast.testbed import scaling
from tsc_fast.testbed.scaling.config import COMPONENTS, ScalingConfig
from tsc_fast.testbed.scaling.fit import crossing, fit_power_law
from tsc_fast.testbed.scaling.report import read_csv
from tsc_fast.testbed.scaling.timing import cost_matrices, measure_point, solve_all, timed
from tsc_fast.testbed.scaling.zoo import SweepPoint, batches_of, build_model, synthetic_data

QUICK = ScalingConfig.quick_config()
EXPECTED = {  # components of every width, per family (BatchNorm recalibration only where there is BatchNorm)
    "mlp": set(COMPONENTS) - {"bn_recal"},
    "cnn": set(COMPONENTS),
    "vit": set(COMPONENTS) - {"bn_recal"},
}
WIDTHS = {"mlp": QUICK.mlp_widths, "cnn": QUICK.cnn_multipliers, "vit": QUICK.vit_ratios}


@pytest.fixture
def one_thread():
    """Tiny workloads on one torch thread (as the quick sweep runs them): a thread pool on a busy machine can
    stall them many times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_fit_power_law_recovers_a_known_exponent(rng):
    widths = 2.0 ** np.arange(6, 15)
    seconds = 3.0 * widths ** 2.0 * np.exp(rng.normal(0.0, 0.05, widths.size))
    exponent, coefficient = fit_power_law(widths, seconds)
    assert exponent == pytest.approx(2.0, abs=0.05)
    assert coefficient == pytest.approx(3.0, rel=0.3)
    exact = fit_power_law([1, 10, 100], [0.5, 5.0 * 10 ** 0.5, 50.0 * 10 ** 1.0])   # 0.5 * w^1.5
    assert exact == pytest.approx((1.5, 0.5), rel=1e-9)


def test_fit_power_law_needs_two_positive_widths():
    with pytest.raises(ValueError):
        fit_power_law([128, 128], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_power_law([128, 256], [1.0, 0.0])   # a zero time cannot be fitted in log space


def test_timed_warms_up_short_calls_and_caps_long_ones():
    calls = []
    median, runs, value = timed(lambda: calls.append(1) or len(calls), repeats=3, budget_s=10.0)
    assert runs == 3 and len(calls) == 4 and value == 4 and median >= 0   # one warm-up, three timed
    calls.clear()
    _, runs, _ = timed(lambda: calls.append(1), repeats=5, budget_s=0.0)
    assert runs == 1 and len(calls) == 1                                  # over budget: the first run only


def test_crossing_reports_measured_and_extrapolated_widths():
    widths = [64, 128, 256, 512]
    lap = {w: 1e-6 * w ** 2 for w in widths}
    stats_ = {w: 1e-4 * w for w in widths}   # ratio 0.01 * w: 0.64 ... 5.12
    assert crossing(lap, stats_, 0.05) == "<= 64"
    assert crossing({w: 1e-8 * w ** 2 for w in widths}, stats_, 0.05) == "512"          # 5.12% at 512
    assert crossing({w: 1e-9 * w ** 2 for w in widths}, stats_, 0.05).startswith("~5,000")  # 0.05 / 1e-5
    assert crossing({w: 1e-9 * w for w in widths}, stats_, 0.05).startswith("not reached")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    assert main(["bench", "scaling", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_sweep_writes_every_component_for_every_width(quick_run):
    rows = read_csv(quick_run / "scaling.csv")
    for family, widths in WIDTHS.items():
        for width in widths:
            got = {r["component"]: r for r in rows if r["family"] == family and int(r["width"]) == width}
            assert set(got) == EXPECTED[family], (family, width)
            for component, row in got.items():
                assert float(row["seconds"]) > 0, (family, width, component)
                assert int(row["repeats"]) >= 1 and int(row["params"]) > 0
    assert (quick_run / "command.txt").read_text().startswith("tsc-fast bench scaling --quick")


def test_quick_sweep_lap_totals_of_ours_and_scipy_agree(quick_run):
    rows = read_csv(quick_run / "scaling.csv")
    totals = {}
    for r in rows:
        if r["component"] in ("lap_ours", "lap_scipy"):
            totals.setdefault((r["family"], r["width"]), {})[r["component"]] = float(r["objective"])
    assert len(totals) == sum(len(w) for w in WIDTHS.values())
    for key, pair in totals.items():
        assert pair["lap_ours"] == pytest.approx(pair["lap_scipy"], rel=1e-9, abs=1e-9), key


def test_quick_sweep_report_and_plots(quick_run):
    report = (quick_run / "report.md").read_text()
    assert "Fitted exponents" in report and "Where the LAP reaches 5% / 50%" in report
    assert "same optimal total" in report and "tsc-fast bench scaling --quick" in report
    for family in WIDTHS:
        assert f"## {family}" in report
        assert is_valid_png(quick_run / f"{family}.png")
        section = report.split(f"## {family} (sweep")[1].split("### LAP share")[0]
        exponent_rows = [line for line in section.splitlines() if line.startswith("| lap_ours |")]
        assert exponent_rows, family
        k_all = exponent_rows[0].split("|")[3].strip()
        assert math.isfinite(float(k_all))


@pytest.mark.parametrize("family,width", [("mlp", 128), ("cnn", 4), ("vit", 4)])
def test_ours_and_scipy_agree_on_the_sweeps_matrices(family, width, one_thread):
    model, shape = build_model(family, width, QUICK)
    batches = batches_of(synthetic_data(shape, QUICK.samples), QUICK.batch_size)
    spec = discover(model, batches[0][0][:2])
    costs = cost_matrices(model, spec, batches)
    assert set(costs) == set(spec.groups)
    for matrix in costs.values():   # self-correlations: symmetric, unit diagonal where a unit varies
        assert np.allclose(matrix, matrix.T, atol=1e-9)
    perms_ours, total_ours = solve_all(costs, spec, "native", threads=1)
    perms_scipy, total_scipy = solve_all(costs, spec, "scipy")
    assert total_ours == pytest.approx(total_scipy, rel=1e-9, abs=1e-9)
    for group, perm in perms_ours.items():
        assert sorted(perm.tolist()) == list(range(spec.groups[group]))
        assert assign.assignment_cost(costs[group], perm) <= np.trace(costs[group]) + 1e-9   # minimised


def test_caps_and_the_memory_guard_skip_components_with_a_note(one_thread):
    config = ScalingConfig.quick_config(scipy_max_width=16, curve_max_width=16, round_max_width=16)
    rows = {r["component"]: r for r in measure_point(SweepPoint("cnn", 4, 32), config, log=lambda _: None)}
    for component in ("lap_scipy", "curve_step", "bn_recal", "round", "round_lap"):
        assert rows[component]["seconds"] == "" and "capped" in rows[component]["note"]
    assert rows["stats"]["seconds"] > 0 and rows["lap_ours"]["seconds"] > 0
    starved = ScalingConfig.quick_config(memory_fraction=0.0)
    rows = measure_point(SweepPoint("mlp", 32, 32), starved, log=lambda _: None)
    assert rows and all(r["seconds"] == "" and "needs" in r["note"] for r in rows)


def test_the_package_exports_what_it_lists():
    assert all(hasattr(scaling, name) for name in scaling.__all__)
    assert scaling.synthetic_data is synthetic_data   # bench/bench_imagenet_scale.py's generator


def test_importing_the_study_loads_no_optional_heavy_module():
    """The CLI imports the package to build its parser: the optional extras torchvision and matplotlib stay
    lazy (imported by the ViT builder and the plots only)."""
    code = ("import sys, tsc_fast.testbed.scaling; "
            "print(*[m for m in ('torchvision', 'matplotlib') if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""
