"""The benchmark suite, its reports, the ablations and the adaptive attack, on tiny CI budgets.

The quick runs are real: victims must implant, some defense must remove most of the backdoor, the landscape's
stage-1 curve must start and end at the same function (un-align preserves it), and the landscape's own re-run of
TSC round 1 must land exactly where ``purify`` (one round) lands.
"""
import copy
import csv
import statistics

import pytest
import torch

from tsc_fast import TSCConfig
from tsc_fast.figures import is_valid_png
from tsc_fast.testbed import reports
from tsc_fast.testbed.ablate import AblationConfig, parse_sweeps
from tsc_fast.testbed.adaptive_attack import AdaptiveConfig, make_adaptive_backdoored_digits, unaligned_parameters
from tsc_fast.batches import make_loader
from tsc_fast.cli import main
from tsc_fast.curve import recalibrate_bn
from tsc_fast.spec import discover
from tsc_fast.metrics import loss_metrics
from tsc_fast.testbed.suite import SuiteConfig, make_victim, parse_attacks

DEFENSES = ("tsc", "ft", "mcr", "fst")


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    torch.set_num_threads(1)
    assert main(["bench", "suite", "--quick", "--out", str(out)]) == 0
    return out


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_suite_table_has_every_cell_and_sane_metrics(quick_suite):
    rows = _rows(quick_suite / "runs.csv")
    cells = {(r["attack"], r["defense"]) for r in rows}
    assert cells == {(a, d) for a in ("badnets", "blended") for d in ("none", *DEFENSES)}
    assert len(rows) == 2 * (1 + len(DEFENSES))
    for row in rows:
        for metric in ("acc", "asr", "ra"):
            assert 0.0 <= float(row[metric]) <= 100.0
        assert float(row["seconds"]) > 0
        if row["defense"] != "none":
            assert int(row["steps"]) > 0
    table = (quick_suite / "table.md").read_text()
    for attack in ("badnets", "blended"):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {attack} |"))
        # the clean-model ASR, then ACC/ASR/RA of the backdoored model and of every defense
        assert line.count("±") == 1 + 3 * (1 + len(DEFENSES)), line
    assert table.startswith("# tsc_fast benchmark suite (digits)") and "Dataset: digits." in table


def test_quick_suite_victims_implant_and_a_defense_removes_the_backdoor(quick_suite):
    rows = _rows(quick_suite / "runs.csv")
    backdoored = {r["attack"]: float(r["asr"]) for r in rows if r["defense"] == "none"}
    assert all(asr >= 90 for asr in backdoored.values()), backdoored
    # the triggers do not fool a model trained on clean data: these are backdoors, and flagged implanted
    assert all(float(r["clean_asr"]) < 20 and r["implanted"] == "True" for r in rows), rows
    defended = [(float(r["asr"]), float(r["acc"])) for r in rows
                if r["attack"] == "badnets" and r["defense"] != "none"]
    assert any(asr <= backdoored["badnets"] - 50 and acc >= 90 for asr, acc in defended), defended
    # every defense saw the same clean subset
    assert len({r["clean_examples"] for r in rows}) == 1


def test_quick_suite_writes_valid_plots(quick_suite):
    for name in ("landscape.png", "defenses_acc_asr.png", "asr_by_attack.png", "acc_by_attack.png",
                 "asr_vs_acc_drop.png"):
        assert is_valid_png(quick_suite / name), name
    assert (quick_suite / "command.txt").read_text().startswith("tsc-fast bench suite --quick")


def test_landscape_reproduces_one_tsc_round(quick_suite):
    import json

    payload = json.loads((quick_suite / "suite.json").read_text())
    landscape, rows = payload["landscape"], payload["rows"]
    stage1, stage2 = landscape["stage1"], landscape["stage2"]
    # the un-aligned copy computes the same function as the original: equal losses at both ends of stage 1
    assert stage1[0]["clean_loss"] == pytest.approx(stage1[-1]["clean_loss"], rel=1e-3)
    assert stage1[0]["poison_loss"] == pytest.approx(stage1[-1]["poison_loss"], rel=1e-3)
    # the stage-2 curve ends at the stage-1 point
    at_t1 = next(p for p in stage1 if p["t"] == pytest.approx(landscape["t_stage1"]))
    assert stage2[-1]["acc"] == pytest.approx(at_t1["acc"], abs=0.3)
    # the quick suite's TSC runs one round: its result is the landscape's stage-2 point at t*
    tsc = next(r for r in rows if r["attack"] == landscape["attack"] and r["defense"] == "tsc")
    at_t2 = next(p for p in stage2 if p["t"] == pytest.approx(landscape["t_stage2"]))
    assert at_t2["acc"] == pytest.approx(tsc["acc"], abs=0.3)
    assert at_t2["asr"] == pytest.approx(tsc["asr"], abs=0.7)


def test_summaries_and_markdown_against_hand_computed_values(tmp_path):
    rows = [{"attack": "a", "rate": 0.1, "seed": s, "defense": d, "acc": acc, "asr": asr, "ra": 100 - asr,
             "seconds": 1.0 + s, "steps": 10, "implanted": d != "x"}
            for s, (acc, asr) in enumerate([(90.0, 10.0), (94.0, 30.0)]) for d in ("none", "tsc")]
    summary = {e["defense"]: e for e in reports.summarise(rows)}
    assert summary["tsc"]["acc"] == 92.0
    assert summary["tsc"]["asr_sd"] == pytest.approx(statistics.stdev([10.0, 30.0]))
    assert summary["tsc"]["seconds"] == 1.5 and summary["tsc"]["runs"] == 2
    table = reports.suite_markdown(rows, ["tsc"])
    assert "92.0 ± 2.8" in table and "20.0 ± 14.1" in table
    assert "| a |" in table and "| a (not implanted) |" not in table
    weak = [dict(r, attack="b", implanted=False) for r in rows]
    assert "| b (not implanted) |" in reports.suite_markdown(rows + weak, ["tsc"])
    path = reports.write_csv(rows, tmp_path / "rows.csv")
    assert [r["acc"] for r in reports.read_csv(path)] == [r["acc"] for r in rows]


def test_clean_model_flag_and_asr_vs_drop_points_against_hand_computed_values(tmp_path):
    def row(attack, defense, seed, acc, asr, implanted=True, clean_asr=2.0):
        return {"attack": attack, "rate": 0.1, "seed": seed, "defense": defense, "acc": acc, "asr": asr,
                "ra": 0.0, "seconds": 1.0, "steps": 1, "implanted": implanted, "clean_asr": clean_asr}

    rows = [row("a", "none", 0, 98.0, 100.0), row("a", "none", 1, 96.0, 100.0),
            row("a", "tsc", 0, 95.0, 4.0), row("a", "tsc", 1, 95.0, 6.0),
            row("b", "none", 0, 97.0, 90.0, False, 80.0), row("b", "tsc", 0, 90.0, 60.0, False, 80.0)]
    points = reports.asr_drop_points(rows)
    assert points == [{"attack": "a", "rate": 0.1, "defense": "tsc", "asr": 5.0, "acc": 95.0, "acc_drop": 2.0,
                       "runs": 2}]                                   # b fools a clean model: left out
    assert len(reports.asr_drop_points(rows, implanted_only=False)) == 2
    # a series without backdoored rows is measured against the main rows' backdoored model
    other = [dict(r, asr=r["asr"] + 10, acc=r["acc"] - 1) for r in rows if r["defense"] == "tsc"]
    assert reports.asr_drop_points(other, rows)[0]["acc_drop"] == pytest.approx(3.0)
    table = reports.suite_markdown(rows, ["tsc"], dataset="mnist")
    assert "Dataset: mnist." in table and "| b (fools a clean model) | 80.0 ± 0.0 |" in table
    assert "| a | 2.0 ± 0.0 |" in table
    assert "(fools a clean model: not judged)" in reports.targets_markdown(rows, ["tsc"])
    path = reports.plot_asr_vs_drop(rows, tmp_path / "fig.png", extra={"tsc t*=0.5": other, "empty": []},
                                    dataset="mnist")
    assert is_valid_png(path)
    assert is_valid_png(reports.plot_asr_vs_drop([], tmp_path / "empty.png"))
    assert SuiteConfig(data="mnist").victim_epochs == 20 and SuiteConfig().victim_epochs == 40
    assert SuiteConfig.quick(data="mnist").victim_epochs == 5 and SuiteConfig.quick().victim_epochs == 15


def test_is_valid_png_rejects_junk(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all, but long enough to be read")
    assert not is_valid_png(junk)
    assert not is_valid_png(tmp_path / "missing.png")


def test_unknown_names_are_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown attack"):
        parse_attacks("badnets,nosuchattack")
    with pytest.raises(ValueError, match="unknown sweep"):
        parse_sweeps("t_stage3")
    with pytest.raises(ValueError, match="digits or mnist"):
        SuiteConfig(data="cifar10")
    with pytest.raises(ValueError, match="digits only"):
        SuiteConfig(data="mnist", attacks="adaptive_badnets")
    with pytest.raises(SystemExit):
        main(["bench", "suite", "--data", "cifar10", "--out", "unused"])
    assert main(["bench", "suite", "--quick", "--attacks", "nosuch", "--out", "unused"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    assert set(parse_attacks("all")) >= {"badnets", "blended", "sig", "wanet"}
    assert parse_attacks("adaptive_badnets,badnets") == ("adaptive_badnets", "badnets")


def test_quick_ablation_writes_tables_and_plots(tmp_path):
    torch.set_num_threads(1)
    sweeps = "t_stage2,augmentation,objective,clean_fraction"
    assert main(["bench", "ablate", "--quick", "--sweeps", sweeps, "--out", str(tmp_path)]) == 0
    rows = reports.read_csv(tmp_path / "ablation.csv")
    quick = AblationConfig.quick_config()
    for sweep in sweeps.split(","):
        assert [str(r["value"]) for r in rows if r["sweep"] == sweep] == [str(v) for v in quick.values(sweep)]
        assert is_valid_png(tmp_path / f"ablation_{sweep}.png")
        assert f"### {sweep}" in (tmp_path / "ablation.md").read_text()
    # the base configuration appears in three sweeps: same victim, same data, same seed -> same result
    base_runs = [r for r in rows if (r["sweep"], str(r["value"])) in
                 {("t_stage2", str(TSCConfig().t_stage2)), ("augmentation", "on"), ("objective", "correlation")}]
    assert len(base_runs) == 3
    assert len({(r["acc"], r["asr"]) for r in base_runs}) == 1
    sizes = [r["clean_examples"] for r in rows if r["sweep"] == "clean_fraction"]
    assert sizes == [72, 144]  # 5% and 10% of 1437
    for row in rows:
        assert 0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100


def _straight_line_losses(setup, t):
    """Losses at w(t) on the straight line to an un-aligned copy (BN recalibrated): what the adaptive attacker
    optimised for."""
    clean = setup.clean_subset(0.1, seed=0)
    batches = make_loader(clean, 128, shuffle=False)
    spec = discover(copy.deepcopy(setup.model), setup.x_test[:2])
    other = unaligned_parameters(setup.model, spec, batches)
    point = copy.deepcopy(setup.model)
    with torch.no_grad():
        for name, p in point.named_parameters():
            p.copy_((1 - t) * p + t * other[name])
    recalibrate_bn(point, batches)
    keep = setup.y_test != setup.attack.target
    return loss_metrics(point, setup.x_test, setup.y_test, setup.attack.apply(setup.x_test[keep]),
                      setup.attack.target)


def test_adaptive_attack_trains_implants_and_survives_the_straight_line():
    torch.set_num_threads(1)
    settings = AdaptiveConfig(warmup_epochs=2, every=10)
    adaptive = make_adaptive_backdoored_digits("badnets", rate=0.1, seed=0, epochs=8, adaptive=settings)
    record = adaptive.config["adaptive_record"]
    assert record["refreshes"] > 0 and record["adaptive_loss"][0] is None and record["adaptive_loss"][-1] > 0
    assert adaptive.before["asr"] >= 90 and adaptive.before["acc"] >= 90, adaptive.before
    plain = make_victim("badnets", 0.1, 0, epochs=8)
    # part-way to its un-aligned copy the adaptive backdoor is far stronger than the plain one (measured: about
    # 90-170x lower poisoned loss at t = 0.4 over seeds 0-2; asserted: 5x)
    adaptive_mid, plain_mid = _straight_line_losses(adaptive, 0.4), _straight_line_losses(plain, 0.4)
    assert adaptive_mid["asr"] >= 90
    assert adaptive_mid["poison_loss"] * 5 <= plain_mid["poison_loss"], (adaptive_mid, plain_mid)
