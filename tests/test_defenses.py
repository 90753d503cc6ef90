"""Baseline defenses in the TSC harness: common interface, budgets, and what each defense really does."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tsc_fast import TSCConfig, purify
from tsc_fast.models import MLP, DigitsCNN
from tsc_fast.testbed.victims import make_backdoored_digits
from tsc_fast.curve import BezierCurve, ParamLayout
from tsc_fast.testbed.defenses import (DEFENSES, FSTConfig, FTConfig, MCRConfig, find_linear_head, run_defense,
                               train_mcr_curve)


@pytest.fixture(scope="module")
def setup():
    # a short victim run: accurate and backdoored enough for these checks, a few seconds on CPU
    return make_backdoored_digits(attack="badnets", seed=0, epochs=12, progress=False)


@pytest.fixture(scope="module")
def clean(setup):
    return setup.clean_subset(0.05)       # 72 images -> adaptive batch 16, 5 steps per epoch


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_params(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


TINY = {"tsc": TSCConfig(rounds=1, curve_steps=5, progress=False),
        "ft": FTConfig(steps=10),
        "mcr": MCRConfig(finetune_steps=5, curve_steps=5),
        "fst": FSTConfig(steps=10)}
EXPECTED_STEPS = {"tsc": 2 * 5, "ft": 10, "mcr": 5 + 5, "fst": 10}


def test_registry_knows_the_four_defenses_and_rejects_bad_requests(setup, clean):
    assert set(DEFENSES) == {"tsc", "ft", "mcr", "fst"}
    with pytest.raises(ValueError, match="unknown defense 'nad'"):
        run_defense("nad", setup.model, clean)
    with pytest.raises(TypeError, match="FTConfig"):
        run_defense("ft", setup.model, clean, config=FSTConfig())
    with pytest.raises(ValueError, match="unknown settings"):
        run_defense("ft", setup.model, clean, config={"learning_rate": 0.1})
    with pytest.raises(TypeError, match="nn.Module"):
        run_defense("ft", setup.model.state_dict(), clean)
    with pytest.raises(ValueError, match="positive"):
        run_defense("ft", setup.model, clean, config=FTConfig(steps=0))
    with pytest.raises(ValueError, match="t must be in"):
        run_defense("mcr", setup.model, clean, config=MCRConfig(t=1.5))


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_defense_returns_a_plain_model_and_a_budget(name, setup, clean):
    before = _params(setup.model)
    buffers = {n: b.clone() for n, b in setup.model.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # TSC warns about so few curve steps
        result = run_defense(name, setup.model, clean, config=TINY[name])
    _assert_same_params(_params(setup.model), before, rtol=0, atol=0)      # the caller's model is untouched
    for n, b in setup.model.named_buffers():
        assert torch.equal(b, buffers[n])
    model = result.model
    assert type(model) is DigitsCNN and not model.training
    assert not any(isinstance(m, BezierCurve) for m in model.modules())
    assert result.name == name and result.seconds > 0
    assert result.budget["steps"] == EXPECTED_STEPS[name]
    assert result.budget["examples"] == 72 and result.budget["batch_size"] == 16
    assert result.budget["epochs"] >= 1 and result.budget["seconds"] == pytest.approx(result.seconds)
    out = model(setup.x_test[:5])
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())   # it did train


def test_budget_follows_a_users_dataloader(setup, clean):
    loader = DataLoader(clean, batch_size=24, shuffle=True)
    result = run_defense("ft", setup.model, loader, config={"epochs": 2, "steps": None})
    assert result.budget["batch_size"] == 24
    assert result.budget["steps"] == 2 * math.ceil(72 / 24) and result.budget["epochs"] == 2


def test_tsc_entry_is_purify(setup, clean):
    config = TSCConfig(rounds=2, curve_steps=5, finetune_epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = run_defense("tsc", setup.model, clean, config=config)
        direct = purify(setup.model, clean, config=config)
    _assert_same_params(_params(wrapped.model), _params(direct.model))
    # 2 rounds x 2 curves x 5 steps, plus one fine-tune epoch (5 steps) between the rounds
    assert wrapped.budget["steps"] == 25 and wrapped.budget["epochs"] == 5
    assert [(h["round"], h["stage"]) for h in wrapped.history["stages"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_fine_tuning_keeps_clean_accuracy(setup, clean):
    result = run_defense("ft", setup.model, clean, config=FTConfig(steps=60))
    after = setup.evaluate(result.model)
    assert setup.before["acc"] > 90
    assert after["acc"] > 80, after                            # chance is 10%


def test_mcr_curve_runs_between_the_given_model_and_its_fine_tuned_copy(setup, clean):
    config = MCRConfig(finetune_steps=10, curve_steps=5)
    curve, record = train_mcr_curve(setup.model, clean, config)
    layout = ParamLayout(setup.model)
    assert torch.equal(curve.start, layout.flatten(setup.model))
    assert torch.equal(curve.end, layout.flatten(record["endpoint"].model))
    # endpoint B is exactly the FT defense with the same settings
    ft = run_defense("ft", setup.model, clean, config=FTConfig(steps=10, lr=config.finetune_lr))
    _assert_same_params(_params(record["endpoint"].model), _params(ft.model))
    # and the defense's point at t = 0 / t = 1 has the parameters of A / B
    at_start = run_defense("mcr", setup.model, clean, config=MCRConfig(t=0.0, finetune_steps=10, curve_steps=5))
    at_end = run_defense("mcr", setup.model, clean, config=MCRConfig(t=1.0, finetune_steps=10, curve_steps=5))
    _assert_same_params(_params(at_start.model), _params(setup.model))
    _assert_same_params(_params(at_end.model), _params(ft.model))
    assert at_start.budget["phases"]["finetune"]["steps"] == 10 and at_start.budget["phases"]["curve"]["steps"] == 5


def test_find_linear_head():
    assert find_linear_head(DigitsCNN())[0] == "fc"
    assert find_linear_head(MLP(depth=2))[0] == "net.5"            # the last Linear, not the first
    assert find_linear_head(MLP(depth=2), "net.3")[0] == "net.3"
    with pytest.raises(TypeError, match="nn.Linear"):
        find_linear_head(DigitsCNN(), "conv1")
    with pytest.raises(ValueError, match="no module named"):
        find_linear_head(DigitsCNN(), "head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_linear_head(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_fst_reinitialises_the_head_and_moves_it_away_from_the_original(setup, clean):
    original = setup.model.fc.weight.detach().clone()
    assert setup.before["asr"] > 90
    result = run_defense("fst", setup.model, clean, config=FSTConfig(steps=150))
    history = result.history
    assert history["head"] == "fc"
    cos = torch.nn.functional.cosine_similarity
    assert abs(history["head_cosine"]["initial"]) < 0.3                # a fresh head, not the original
    assert history["head_cosine"]["final"] < history["head_cosine"]["initial"] - 0.1
    final = result.model.fc.weight.detach()
    assert float(cos(final.reshape(1, -1), original.reshape(1, -1))) == pytest.approx(
        history["head_cosine"]["final"], abs=1e-5)
    assert float(final.norm()) == pytest.approx(float(original.norm()), rel=1e-5)     # the norm constraint
    after = setup.evaluate(result.model)
    # 150 steps re-learn a usable head from 72 clean images (chance is 10%; a longer run recovers more) while the
    # head pushed away from the compromised one no longer answers the trigger
    assert after["acc"] > 40 and after["asr"] < 20, after
