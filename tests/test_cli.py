"""The command line: the demo's JSON report, safe checkpoint loading and clear errors."""
import json

import pytest
import torch

from tsc_fast.models import DigitsCNN, PreActResNet18
from tsc_fast.cli import main
from tsc_fast.model_io import save_model

FAST = ["--rounds", "1", "--curve-steps", "8", "--no-progress"]


def test_demo_writes_report_and_model(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    with pytest.warns(UserWarning):
        assert main(["demo", *FAST, "--json", str(report_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ACC" in printed and "before" in printed and "after" in printed
    report = json.loads(report_path.read_text())
    for side in ("before", "after"):
        assert set(report[side]) == {"acc", "asr", "ra"}
        assert all(0.0 <= v <= 100.0 for v in report[side].values())
    assert report["before"]["asr"] > 90 and report["seconds"] > 0
    assert report["config"]["rounds"] == 1 and report["config"]["curve_steps"] == 8
    assert (tmp_path / "out" / "purified.safetensors").is_file()


def test_purify_round_trip_from_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "victim.safetensors"
    save_model(DigitsCNN(), ckpt)
    with pytest.warns(UserWarning):
        code = main(["purify", "--model", str(ckpt), "--arch", "cnn", "--data", "digits", "--out",
                     str(tmp_path / "out"), "--attack", "badnets", *FAST])
    assert code == 0
    assert "purified model" in capsys.readouterr().out
    assert (tmp_path / "out" / "purified.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (["--model", "missing.safetensors", "--arch", "cnn"], "not found"),
    (["--model", "CKPT", "--arch", "resnet1000"], "unknown architecture"),
    (["--model", "CKPT", "--arch", "mlp"], "missing"),
])
def test_purify_errors_are_clear(tmp_path, capsys, args, message):
    ckpt = tmp_path / "victim.safetensors"
    save_model(DigitsCNN(), ckpt)
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    assert main(["purify", *args, "--data", "digits", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert message in capsys.readouterr().err.lower()


def test_purify_refuses_a_checkpoint_of_another_architecture(tmp_path, capsys):
    ckpt = tmp_path / "resnet.pt"
    torch.save(PreActResNet18(width=4).state_dict(), ckpt)
    assert main(["purify", "--model", str(ckpt), "--arch", "cnn", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "error" in capsys.readouterr().err
