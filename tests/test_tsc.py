"""The TSC loop: configuration plans, a complete small run, and purification on a real backdoor."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tsc_fast import TSCConfig, purify
from tsc_fast.testbed.victims import make_backdoored_digits
from tsc_fast.curve import BezierCurve
from tsc_fast.tsc import adaptive_batch_size


@pytest.fixture(scope="module")
def badnets():
    return make_backdoored_digits(attack="badnets", seed=0, progress=False)


def test_adaptive_batch_size():
    assert adaptive_batch_size(72) == 16        # 5% of digits: about five steps per epoch
    assert adaptive_batch_size(2500) == 256     # the official regime
    assert adaptive_batch_size(10) == 10        # never above the set size
    assert 16 <= adaptive_batch_size(700) <= 256


def test_default_plan_counts_steps_and_official_plan_counts_epochs():
    plan = TSCConfig().plan(72, image_size=8)
    assert plan.batch_size == 16 and plan.curve_steps >= 2000 and plan.augment_shift == 1
    assert plan.cosine_t_max == plan.curve_epochs
    official = TSCConfig.official().plan(72, image_size=32)
    assert (official.batch_size, official.curve_epochs, official.cosine_t_max) == (256, 200, 100)
    assert official.curve_steps == 200 and official.augment_shift == 4
    assert TSCConfig(augment_shift=0).plan(72, 8).augment_shift == 0
    with pytest.raises(ValueError, match="empty"):
        TSCConfig().plan(0, 8)


def test_short_run_reports_history_and_returns_a_plain_model(badnets):
    clean = badnets.clean_subset(0.05)
    original = copy.deepcopy(badnets.model.state_dict())
    config = TSCConfig(rounds=2, curve_steps=10, finetune_epochs=1, progress=False)
    with pytest.warns(UserWarning, match="optimiser steps"):
        result = purify(badnets.model, clean, config=config)
    for name, value in badnets.model.state_dict().items():   # the caller's model is untouched
        assert torch.equal(value, original[name])
    assert isinstance(result.model, nn.Module) and not result.model.training
    assert not any(isinstance(m, BezierCurve) for m in result.model.modules())
    assert [(h["round"], h["stage"]) for h in result.history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    first = result.history[0]
    assert first["t"] == 0.4 and len(first["curve_losses"]) == result.plan.curve_epochs
    for group, identity in first["perm_cost"]["identity"].items():   # un-align: far below identity (= #units)
        assert first["perm_cost"]["achieved"][group] < identity
    assert "finetune_losses" in result.history[1] and "finetune_losses" not in result.history[3]
    assert set(result.spec.groups) and result.seconds > 0


def test_dataloader_and_custom_loss_are_used(badnets):
    clean = badnets.clean_subset(0.05)
    calls = []

    def loss_fn(model, batch):
        calls.append(len(batch[0]))
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    config = TSCConfig(rounds=1, curve_steps=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        purify(badnets.model, DataLoader(clean, batch_size=24, shuffle=True), loss_fn=loss_fn, config=config)
    assert calls and set(calls) <= {24}        # the user's loader's batching, for both curves


@pytest.mark.slow
def test_tsc_removes_a_badnets_backdoor(badnets):
    """A real purification at a reduced budget: ASR must collapse while the model stays accurate."""
    assert badnets.before["asr"] > 90 and badnets.before["acc"] > 95
    result = purify(badnets.model, badnets.clean_subset(0.05),
                    config=TSCConfig(rounds=1, curve_steps=600, progress=False))
    after = badnets.evaluate(result.model)
    assert after["asr"] < 30, after
    assert after["acc"] > 85, after


def test_on_curve_sees_every_trained_curve_before_its_point_is_taken():
    from tsc_fast.models import DigitsCNN

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    config = TSCConfig(rounds=2, curve_steps=4, batch_size=16, progress=False, warn_below_steps=0)
    seen = []

    def record(round_, stage, curve, stats_batches):
        assert isinstance(curve, BezierCurve)
        point = curve.point(config.t_stage2 if stage == 2 else config.t_stage1)
        seen.append((round_, stage, [p.detach().clone() for p in point.parameters()]))

    result = purify(DigitsCNN(), data, config=config, on_curve=record)
    assert [(r, s) for r, s, _ in seen] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # the purified model is the last curve's point at t* (BN recalibration changes buffers, not weights)
    for got, want in zip(result.model.parameters(), seen[-1][2]):
        assert torch.equal(got.detach(), want)
