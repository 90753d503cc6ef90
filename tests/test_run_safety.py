"""Nothing silently wrong, nothing lost: settings validated at construction, runs that diverge stop where they
diverged and save nothing, run folders are never clobbered, checkpoints and run.json resist tampering, and bad
inputs get errors that name the problem."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from tsc_fast import TSCConfig, purify
from tsc_fast import checkpoint
from tsc_fast.models import DigitsCNN
from tsc_fast.cli import main
from tsc_fast.model_io import save_model
from tsc_fast.training import DivergedError
from tsc_fast.validate import SettingError

QUICK = dict(rounds=1, curve_steps=3, batch_size=8, progress=False, warn_below_steps=0)
CLI_QUICK = ["--rounds", "1", "--curve-steps", "2", "--no-progress"]


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsCNN()


# --- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("rounds", 0), ("rounds", -2), ("rounds", 1.5), ("rounds", True), ("t_stage1", -3.0), ("t_stage2", 1.01),
    ("t_stage2", float("nan")), ("t_stage1", float("inf")), ("curve_steps", -1), ("curve_epochs", 0),
    ("momentum", 5.0), ("momentum", 1.0), ("cosine_t_max", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -0.1),
    ("weight_decay", -1e-4), ("finetune_epochs", -1), ("stats_batch_size", 0), ("augment_shift", -1),
    ("objective", "l3"), ("tap_at", "somewhere"), ("assign_backend", "magic"), ("autocast", "fp8"),
    ("augment_flip", "yes"), ("verify", 1), ("seed", -1), ("device", "gpu7"),
])
def test_invalid_settings_are_refused_at_construction_naming_the_setting(field, value):
    with pytest.raises(SettingError, match=field):
        TSCConfig(**{field: value})


def test_both_budgets_none_is_refused():
    with pytest.raises(SettingError, match="curve_steps or curve_epochs"):
        TSCConfig(curve_steps=None, curve_epochs=None)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["rounds", "t_stage1", "t_stage2", "curve_steps", "curve_epochs", "batch_size", "lr",
                        "momentum", "weight_decay", "l2_coeff", "cosine_t_max", "finetune_epochs", "finetune_lr",
                        "stats_batch_size", "bn_batch_size", "augment_shift", "seed", "warn_below_steps"]),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20), st.text(max_size=4),
                 st.booleans(), st.none()))
def test_fuzzed_settings_either_construct_a_valid_config_or_raise_a_setting_error(field, value):
    try:
        config = TSCConfig(**{field: value})
    except SettingError as error:
        assert field in str(error)
        return
    # accepted: then the value is inside the documented range
    stored = getattr(config, field)
    assert stored is None or (not isinstance(stored, (str, bool)) and math.isfinite(float(stored)))
    if field in ("t_stage1", "t_stage2"):
        assert 0.0 <= stored <= 1.0
    if field == "momentum":
        assert 0.0 <= stored < 1.0


# --- divergence -------------------------------------------------------------------------------------------------

def test_a_nan_gradient_on_the_last_step_stops_the_run_naming_where():
    """The loss stays finite; only the gradient is NaN (0 * d sqrt(z)/dz at z = 0), on the very last step."""
    calls = {"n": 0}
    config = TSCConfig(**QUICK)
    total = 2 * config.plan(24, 8).curve_steps  # both curves of the one round

    def loss_fn(model, batch):
        calls["n"] += 1
        out = model(batch[0])
        loss = nn.functional.cross_entropy(out, batch[1])
        if calls["n"] == total:
            loss = loss + 0.0 * torch.sqrt((out - out.detach()).pow(2).sum())
        return loss

    with pytest.raises(DivergedError, match=r"round 1/1 curve 2: epoch \d+, step \d+.*NaN/inf"):
        purify(_model(), _data(), loss_fn=loss_fn, config=config)


def test_cli_refuses_a_nan_t_and_writes_no_model(tmp_path, capsys):
    ckpt = tmp_path / "victim.safetensors"
    save_model(_model(), ckpt)
    code = main(["purify", "--model", str(ckpt), "--arch", "cnn", "--out", str(tmp_path / "o"), "--t-stage2",
                 "nan", *CLI_QUICK])
    assert code == 2 and "t_stage2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_without_permutation_groups_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="nothing to permute"):
        purify(model, _data(), config=TSCConfig(**QUICK))


# --- inputs that used to give raw torch errors ------------------------------------------------------------------

def test_nan_images_are_named_not_blamed_on_the_permutation():
    x, y = _data().tensors
    x = x.clone()
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        purify(_model(), TensorDataset(x, y), config=TSCConfig(**QUICK))


def test_nan_weights_are_named():
    model = _model()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="conv2.weight"):
        purify(model, _data(), config=TSCConfig(**QUICK))


@pytest.mark.parametrize("case,error,message", [
    ("empty_loader", ValueError, "yield no batch"),
    ("unbatched_loader", ValueError, "batch_size=None"),
    ("tuple", TypeError, "TensorDataset"),
    ("labels_out_of_range", ValueError, "model has 10 outputs"),
    ("float_labels", ValueError, "integer class indices"),
    ("meta_model", ValueError, "meta device"),
    ("not_a_model", TypeError, "nn.Module"),
])
def test_bad_inputs_get_named_errors(case, error, message):
    data, model = _data(), _model()
    x, y = data.tensors
    if case == "empty_loader":
        data = DataLoader(data, batch_size=32, drop_last=True)
    elif case == "unbatched_loader":
        data = DataLoader(data, batch_size=None)
    elif case == "tuple":
        data = (x, y)
    elif case == "labels_out_of_range":
        data = TensorDataset(x, y + 5)
    elif case == "float_labels":
        data = TensorDataset(x, y.float())
    elif case == "meta_model":
        with torch.device("meta"):
            model = DigitsCNN()
    elif case == "not_a_model":
        model = "victim.pt"
    with pytest.raises(error, match=message):
        purify(model, data, config=TSCConfig(**QUICK))


def test_a_non_scalar_loss_is_named():
    def per_example(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="scalar"):
        purify(_model(), _data(), loss_fn=per_example, config=TSCConfig(**QUICK))


# --- run folders ------------------------------------------------------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.safetensors"
    save_model(_model(), path)
    return path


def _purify(victim, out, *extra):
    return main(["purify", "--model", str(victim), "--arch", "cnn", "--out", str(out), *CLI_QUICK, *extra])


def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, victim, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        assert _purify(victim, out) == 0
    first = (out / "purified.safetensors").read_bytes()
    (out / "notes.txt").write_text("mine")
    assert _purify(victim, out, "--seed", "3") == 2
    assert "not empty" in capsys.readouterr().err and (out / "purified.safetensors").read_bytes() == first
    with pytest.warns(UserWarning):
        assert _purify(victim, out, "--seed", "3", "--overwrite") == 0
    assert (out / "purified.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "mine"          # only the run's own outputs are replaced
    assert json.loads((out / "run.json").read_text())["argv"][-2:] == ["--seed", "3"]


def test_the_input_checkpoint_is_never_overwritten(tmp_path, victim, capsys):
    out = tmp_path / "run"
    out.mkdir()
    inside = out / "purified.safetensors"
    shutil.copy(victim, inside)
    before = inside.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _purify(inside, out, *extra) == 2
        assert "never overwritten" in capsys.readouterr().err
    assert inside.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["purified.safetensors"]


def test_out_naming_a_file_and_an_unwritable_json_fail_before_the_run(tmp_path, victim, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    assert _purify(victim, existing) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert _purify(victim, tmp_path / "o", "--json", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _interrupted_cli_run(monkeypatch, victim, out, crash_after=3):
    real_save, saves = checkpoint.save, []

    def crashing_save(*args, **kwargs):
        saves.append(real_save(*args, **kwargs))
        if len(saves) == crash_after:
            raise KeyboardInterrupt
        return saves[-1]

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        main(["purify", "--model", str(victim), "--arch", "cnn", "--out", str(out), "--rounds", "2",
              "--curve-steps", "4", "--checkpoint-interval", "0", "--no-progress"])
    monkeypatch.setattr(checkpoint, "save", real_save)


def test_a_moved_run_folder_resumes_to_the_uninterrupted_result(tmp_path, victim, monkeypatch):
    with pytest.warns(UserWarning):
        assert main(["purify", "--model", str(victim), "--arch", "cnn", "--out", str(tmp_path / "reference"),
                     "--rounds", "2", "--curve-steps", "4", "--no-progress"]) == 0
    _interrupted_cli_run(monkeypatch, victim, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "first", moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.warns(UserWarning):
        assert main(["purify", "--resume", "moved", "--no-progress"]) == 0
    from safetensors.torch import load_file
    expected, got = load_file(tmp_path / "reference" / "purified.safetensors"), load_file(moved / "purified.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("edit,message", [
    (lambda meta: meta.update(round=99), "modified or damaged"),
    (lambda meta: meta.update(history=None), "modified or damaged"),
    (lambda meta: meta.pop("step"), "modified or damaged"),
])
def test_edited_checkpoint_metadata_is_refused(tmp_path, victim, monkeypatch, capsys, edit, message):
    out = tmp_path / "run"
    _interrupted_cli_run(monkeypatch, victim, out)
    record_path = _newest_record(out)
    record = json.loads(record_path.read_text())
    edit(record["meta"])
    record_path.write_text(json.dumps(record))
    assert main(["purify", "--resume", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "purified.safetensors").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda meta: meta.update(round=99), "outside"),
    (lambda meta: meta.update(step="bogus"), "not one of"),
    (lambda meta: meta.update(perms_used=[]), "alignments"),
    (lambda meta: meta.update(history=None), "damaged"),
    (lambda meta: meta.pop("pending"), "damaged"),
])
def test_edits_that_keep_a_valid_digest_are_still_refused_by_the_field_checks(tmp_path, victim, monkeypatch, capsys,
                                                                             edit, message):
    """Someone who recomputes the digest still cannot make --resume run from an impossible position."""
    out = tmp_path / "run"
    _interrupted_cli_run(monkeypatch, victim, out)
    record_path = _newest_record(out)
    record = json.loads(record_path.read_text())
    edit(record["meta"])
    record["meta_sha256"] = checkpoint._meta_digest(record["meta"])
    record_path.write_text(json.dumps(record))
    assert main(["purify", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "purified.safetensors").exists()


def _newest_record(out: Path) -> Path:
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    return out / "checkpoints" / f"{pointer['name']}.json"


@pytest.mark.parametrize("content", ["{not json", '{"argv": "--model x"}', '["--model"]', '{"argv": [1, 2]}'])
def test_a_damaged_run_json_is_named(tmp_path, capsys, content):
    (tmp_path / "run.json").write_text(content)
    assert main(["purify", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "damaged" in err


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".ckpt-000001.safetensors.tmp-{dead.stdout.strip()}"
    live = folder / f".ckpt-000002.safetensors.tmp-{os.getppid()}"  # a process that is still running
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    checkpoint.save(folder, {"x": torch.ones(2)}, {"round": 0})
    assert not stale.exists() and live.exists()
    tensors, meta = checkpoint.load(folder)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"round": 0}


# --- the command line, fuzzed -----------------------------------------------------------------------------------

INVALID = {
    "--rounds": st.sampled_from(["0", "-2", "1.5", "x", ""]),
    "--curve-steps": st.sampled_from(["0", "-5", "2.5", "nan"]),
    "--t-stage1": st.sampled_from(["nan", "inf", "-3", "1.5", "-0.01", "abc"]),
    "--t-stage2": st.sampled_from(["nan", "-inf", "2", "x"]),
    "--clean-fraction": st.sampled_from(["0", "-0.5", "1.5", "nan"]),
    "--clean-count": st.sampled_from(["0", "-3", "100000", "1.5"]),
    "--num-classes": st.sampled_from(["0", "-1", "3"]),
    "--image-size": st.sampled_from(["0", "-8"]),
    "--target": st.sampled_from(["-1", "10", "99"]),
    "--seed": st.sampled_from(["-1", "x"]),
    "--normalize": st.sampled_from(["1,2,3", "0.5,0", "cifar", "a,b"]),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(INVALID)), st.none(), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: INVALID[k] for k in keys})))
def test_fuzzed_invalid_cli_values_give_a_clear_error_and_no_file(tmp_path_factory, capsys, values):
    folder = tmp_path_factory.mktemp("fuzz")
    victim = folder / "victim.safetensors"
    save_model(_model(), victim)
    args = ["purify", "--model", str(victim), "--arch", "cnn", "--out", str(folder / "out"), "--no-progress",
            "--rounds", "1", "--curve-steps", "2"]
    for flag, value in values.items():
        args += [f"{flag}={value}"]
    if "--target" in values:
        args += ["--attack", "badnets"]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse refuses a value of the wrong type: its own usage error, code 2
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, (values, err)
    assert "error" in err and "Traceback" not in err
    assert not (folder / "out" / "purified.safetensors").exists()


def test_every_value_the_cli_accepts_gives_a_finite_saved_model(tmp_path, victim):
    from safetensors.torch import load_file

    with pytest.warns(UserWarning):
        assert _purify(victim, tmp_path / "edge", "--t-stage1", "0", "--t-stage2", "1") == 0
    saved = load_file(tmp_path / "edge" / "purified.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in saved.values() if v.is_floating_point())
    assert np.isfinite(json.loads((tmp_path / "edge" / "report.json").read_text())["seconds"])
