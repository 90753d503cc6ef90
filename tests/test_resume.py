"""Checkpoints and resumption: an interrupted run, resumed, ends exactly where an uninterrupted one does; damaged or
foreign checkpoints are refused with a clear error."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tsc_fast import checkpoint
from tsc_fast.models import DigitsCNN
from tsc_fast.checkpoint import CheckpointError
from tsc_fast.cli import main
from tsc_fast.model_io import save_model
from tsc_fast.tsc import TSCConfig, purify

CONFIG = TSCConfig(rounds=2, curve_steps=12, batch_size=16, finetune_epochs=2, progress=False, warn_below_steps=0)


class Interrupted(Exception):
    pass


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsCNN()


def _assert_same_run(a, b):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert [h["curve_losses"] for h in a.history] == [h["curve_losses"] for h in b.history]
    assert [h.get("finetune_losses") for h in a.history] == [h.get("finetune_losses") for h in b.history]
    assert len(a.perms) == len(b.perms) == 2 * CONFIG.rounds
    for pa, pb in zip(a.perms, b.perms):
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[g], pb[g]) for g in pa)


@pytest.fixture(scope="module")
def uninterrupted():
    return purify(_model(), _data(), config=CONFIG)


# Saves of this run (interval 0): one after every step and every epoch (4 per curve, 2 in the fine-tune), 27 in
# all: 1 = after the first un-align, 3 = inside the stage-1 curve, 13 = inside round 1's fine-tune,
# 24 = inside round 2's stage-2 curve.
@pytest.mark.parametrize("crash_after_save", [1, 3, 13, 24])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, crash_after_save):
    real_save, saves = checkpoint.save, []

    def crashing_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saves.append(path)
        if len(saves) == crash_after_save:
            raise Interrupted
        return path

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(Interrupted):
        purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path, checkpoint_interval_s=0)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path, checkpoint_interval_s=0,
                     resume=True)
    assert resumed.resumed_from == str(tmp_path)
    _assert_same_run(uninterrupted, resumed)


def test_resuming_a_finished_run_returns_its_result(tmp_path, uninterrupted):
    purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path)
    again = purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(uninterrupted, again)


def test_checkpoints_are_pruned_to_the_newest_two(tmp_path):
    purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path, checkpoint_interval_s=0)
    names = sorted(p.name for p in tmp_path.iterdir())
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["index"] > 10
    assert names == sorted([f"ckpt-{latest['index'] - k:06d}.{ext}" for k in (0, 1) for ext in ("json", "safetensors")]
                           + ["latest.json"])


@pytest.fixture
def finished(tmp_path):
    purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path)
    return tmp_path


def test_corrupt_tensors_are_refused(finished):
    name = json.loads((finished / "latest.json").read_text())["name"]
    blob = bytearray((finished / f"{name}.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (finished / f"{name}.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        purify(_model(), _data(), config=CONFIG, checkpoint_dir=finished, resume=True)


def test_damaged_pointer_is_refused(finished):
    (finished / "latest.json").write_text('{"index": 3, "na')
    with pytest.raises(CheckpointError, match="damaged"):
        purify(_model(), _data(), config=CONFIG, checkpoint_dir=finished, resume=True)


@pytest.mark.parametrize("change", ["model", "data", "settings"])
def test_checkpoint_of_another_run_is_refused(finished, change):
    model = _model(seed=1) if change == "model" else _model()
    data = _data(seed=1) if change == "data" else _data()
    config = TSCConfig(**{**CONFIG.to_dict(), "t_stage2": 0.6}) if change == "settings" else CONFIG
    with pytest.raises(CheckpointError, match="different run"):
        purify(model, data, config=config, checkpoint_dir=finished, resume=True)


def test_resume_without_a_checkpoint_never_starts_afresh(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        purify(_model(), _data(), config=CONFIG, checkpoint_dir=tmp_path / "missing", resume=True)


def test_optimizer_state_survives_split_and_join():
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.randn(5)
    optimizer.step()
    tensors, plain = checkpoint.split_state("opt", optimizer.state_dict())
    json.dumps(plain)  # the plain part is JSON
    restored = checkpoint.join_state(tensors, json.loads(json.dumps(plain)))
    assert list(restored["state"]) == [0]
    assert torch.equal(restored["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert restored["param_groups"] == optimizer.state_dict()["param_groups"]


# ----------------------------------------------------------------------------------------------- a real kill
def _cli(*args):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "tsc_fast.cli", "purify", *args], env


def test_killed_cli_run_resumes_to_the_uninterrupted_result(tmp_path):
    torch.manual_seed(0)
    victim = tmp_path / "victim.safetensors"
    save_model(DigitsCNN(), victim)
    settings = ["--model", str(victim), "--arch", "cnn", "--rounds", "2", "--curve-steps", "300",
                "--checkpoint-interval", "0", "--no-progress"]
    reference_cmd, env = _cli(*settings, "--out", str(tmp_path / "reference"))
    reference = subprocess.Popen(reference_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_cmd, _ = _cli(*settings, "--out", str(tmp_path / "killed"))
    victim_run = subprocess.Popen(killed_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim_run.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["index"] >= 5:
            break
        time.sleep(0.05)
    victim_run.send_signal(signal.SIGKILL)
    assert victim_run.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "purified.safetensors").exists()

    resume_cmd, _ = _cli("--resume", str(tmp_path / "killed"), "--no-progress")
    resumed = subprocess.run(resume_cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()
    expected = load_file(tmp_path / "reference" / "purified.safetensors")
    got = load_file(tmp_path / "killed" / "purified.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_cli_resume_errors_are_clear(tmp_path, capsys):
    assert main(["purify", "--resume", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err
    assert main(["purify", "--arch", "cnn"]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", [["--model", "v.safetensors"], ["--model=v.safetensors"],
                                      ["--mod", "v.safetensors"]])
def test_run_arguments_are_stored_with_absolute_paths_however_spelled(tmp_path, monkeypatch, spelling):
    from tsc_fast.cli import build_parser
    from tsc_fast.cli.purify import canonical_argv
    from tsc_fast.run_folder import load_run_arguments, save_run_arguments

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["purify", *spelling, "--arch", "cnn", "--out", "out", "--rounds", "2"])
    save_run_arguments(Path("out"), canonical_argv(args), Path.cwd())
    stored, cwd, folder = load_run_arguments(tmp_path / "out" / "checkpoints")
    assert stored == ["--model", str(tmp_path / "v.safetensors"), "--arch", "cnn", "--out", str(tmp_path / "out"),
                      "--rounds", "2"]
    assert cwd == tmp_path and folder == tmp_path / "out"


def test_resume_with_a_shuffling_user_dataloader(tmp_path, monkeypatch):
    """A user's DataLoader(shuffle=True) draws its order from the global RNG: checkpoints carry that state."""
    def loader():
        return torch.utils.data.DataLoader(_data(), batch_size=16, shuffle=True)

    expected = purify(_model(), loader(), config=CONFIG)
    real_save, saves = checkpoint.save, []

    def crashing_save(*args, **kwargs):
        saves.append(real_save(*args, **kwargs))
        if len(saves) == 7:  # after round 1's re-align: the RNG has moved through two curves
            raise Interrupted
        return saves[-1]

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(Interrupted):
        purify(_model(), loader(), config=CONFIG, checkpoint_dir=tmp_path, checkpoint_interval_s=0)
    monkeypatch.setattr(checkpoint, "save", real_save)
    model = _model()
    torch.manual_seed(123)  # a fresh process does not share the interrupted one's RNG state
    resumed = purify(model, loader(), config=CONFIG, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(expected, resumed)


def test_resume_accepts_the_same_paths_written_relatively_and_refuses_others(tmp_path, monkeypatch, capsys):
    from tsc_fast.run_folder import save_run_arguments

    monkeypatch.chdir(tmp_path)
    save_run_arguments(Path("out"), ["--model", str(tmp_path / "v.safetensors"), "--arch", "cnn", "--out",
                                     str(tmp_path / "out")], tmp_path)
    # the same model written relatively passes the check and fails later, on the missing file
    assert main(["purify", "--resume", "out", "--model", "v.safetensors"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["purify", "--resume", "out", "--model", "other.safetensors"]) == 2
    assert "differs from the interrupted run" in capsys.readouterr().err
    assert main(["purify", "--resume", "out", "--arch", "mlp"]) == 2
    assert "differs from the interrupted run" in capsys.readouterr().err
