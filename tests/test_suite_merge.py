"""Joining suite runs into one report, and the table that judges each defense against the issue's bar."""
import json

import pytest

from tsc_fast.cli import main
from tsc_fast.testbed.reports import TARGETS, targets_markdown
from tsc_fast.testbed.suite import SuiteConfig, merge_suite_runs


def _row(attack, rate, seed, defense, acc, asr, implanted=True):
    return {"attack": attack, "rate": rate, "seed": seed, "defense": defense, "acc": acc, "asr": asr, "ra": 0.0,
            "seconds": 1.0, "steps": 10, "epochs": 1, "clean_examples": 72, "implanted": implanted}


ROWS = [_row("badnets", 0.1, s, "none", 99.0, 100.0) for s in (0, 1)] + [
    _row("badnets", 0.1, 0, "tsc", 97.0, 10.0), _row("badnets", 0.1, 1, "tsc", 96.0, 12.0),  # ASR 11, drop 2.5
    _row("badnets", 0.1, 0, "ft", 98.5, 30.0), _row("badnets", 0.1, 1, "ft", 98.5, 20.0),    # ASR 25
    _row("sig", 0.1, 0, "none", 99.0, 20.0, False), _row("sig", 0.1, 0, "tsc", 99.0, 1.0, False),
]


def test_targets_table_judges_means_against_the_bar():
    text = targets_markdown(ROWS, ["tsc", "ft"])
    badnets = next(line for line in text.splitlines() if "| badnets |" in line)
    assert "11.0 / 2.5 ✓" in badnets and "25.0 / 0.5 |" in badnets and badnets.endswith("| tsc |")
    sig = next(line for line in text.splitlines() if "| sig |" in line)
    assert "not judged" in sig and "✓" not in sig
    assert "of 1 implanted): tsc 1, ft 0" in text
    # the tighter MNIST bar (ASR <= 5, drop <= 1): the same numbers clear nothing
    tight = targets_markdown(ROWS, ["tsc", "ft"], *TARGETS["mnist"])
    assert "ASR <= 5% with an ACC drop <= 1 points" in tight and "of 1 implanted): tsc 0, ft 0" in tight


def _suite_folder(path, rows, rate, landscape):
    config = SuiteConfig(attacks=("badnets",), rates=(rate,), seeds=(0, 1), defenses=("tsc", "ft"))
    path.mkdir()
    (path / "suite.json").write_text(json.dumps({"config": config.to_dict(), "rows": rows, "landscape": landscape,
                                                 "seconds": 5.0}))
    (path / "command.txt").write_text(f"tsc-fast bench suite --rates {rate}\n")
    return path


def test_merge_joins_rows_rates_and_commands(tmp_path):
    first = _suite_folder(tmp_path / "a", [r for r in ROWS if r["attack"] == "badnets"], 0.1, None)
    second_rows = [dict(r, rate=0.01) for r in ROWS if r["attack"] == "badnets"]
    second = _suite_folder(tmp_path / "b", second_rows, 0.01, None)
    out = tmp_path / "merged"
    assert main(["bench", "merge", str(first), str(second), "--out", str(out)]) == 0
    merged = json.loads((out / "suite.json").read_text())
    assert len(merged["rows"]) == 12 and merged["seconds"] == 10.0
    assert merged["config"]["rates"] == [0.1, 0.01]
    table = (out / "table.md").read_text()
    assert "### poisoning rate 0.1" in table and "### poisoning rate 0.01" in table
    # judged against the digits' bar (drop <= 2): TSC's 2.5-point drop misses it at both rates
    assert "ASR <= 15% with an ACC drop <= 2 points" in table and "of 2 implanted): tsc 0, ft 0" in table
    assert (out / "command.txt").read_text().count("tsc-fast bench") == 3


def test_merge_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="suite.json"):
        merge_suite_runs([tmp_path], tmp_path / "out")
