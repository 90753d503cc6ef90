"""The options that try to keep accuracy: weight averaging along the curve, sharpness-aware curve training,
t* chosen on held-out clean data, and a final distillation step; each against an independent computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tsc_fast import TSCConfig, checkpoint, purify
from tsc_fast.curve import BezierCurve, distillation_loss
from tsc_fast.models import DigitsCNN
from tsc_fast.training import optimise

QUICK = dict(rounds=1, curve_steps=4, batch_size=8, progress=False, warn_below_steps=0)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsCNN()


def test_averaged_weights_are_the_mean_of_the_curve_over_the_interval():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    curve = BezierCurve(a, b)
    with torch.no_grad():
        curve.middle.add_(torch.randn_like(curve.middle))
    ts = np.linspace(0.3, 0.6, 20001, dtype=np.float64)
    numeric = torch.stack([curve.weights(float(t)).double() for t in ts]).mean(0)
    torch.testing.assert_close(curve.averaged_weights(0.3, 0.6).double(), numeric, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(curve.averaged_weights(-0.2, 0.0), curve.weights(0.0))     # clipped to [0, 1]
    point = curve.point(0.45, span=0.3)
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in point.parameters()]),
                               curve.averaged_weights(0.3, 0.6).detach())


def test_sam_step_takes_the_gradient_at_the_ascended_point():
    """On f(w) = sum(c * w^4) the SAM update is w - lr * f'(w + rho * g / |g|), with g = f'(w)."""
    c = torch.tensor([1.0, 2.0, 0.5])
    w0 = torch.tensor([0.3, -0.7, 1.1])
    w = nn.Parameter(w0.clone())
    lr, rho = 0.1, 0.05

    def loss(batch, generator):
        return (c * w ** 4).sum()

    optimise([w], [torch.zeros(1)], 1, loss, lr=lr, momentum=0.0, sam_rho=rho, progress=False)
    g = 4 * c * w0 ** 3
    ascended = w0 + rho * g / g.norm()
    expected = w0 - lr * 4 * c * ascended ** 3
    torch.testing.assert_close(w.detach(), expected)


def test_sam_repeats_the_steps_random_draws():
    draws = []

    def loss(batch, generator):
        draws.append(float(torch.rand((), generator=generator)))
        return (p ** 2).sum() * draws[-1]

    p = nn.Parameter(torch.ones(2))
    optimise([p], [torch.zeros(1)] * 3, 1, loss, lr=0.1, sam_rho=0.1, progress=False)
    assert len(draws) == 6 and all(draws[i] == draws[i + 1] for i in range(0, 6, 2))
    assert len(set(draws)) == 3


def test_distillation_loss_is_the_tempered_kl_plus_cross_entropy():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    temperature, alpha = 3.0, 0.7
    got = distillation_loss(teacher, temperature, alpha)(student, (x, y))
    p = F.softmax(teacher(x).detach() / temperature, 1)
    log_q = F.log_softmax(student(x) / temperature, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(student(x), y)
    torch.testing.assert_close(got, expected)


def test_holdout_selection_follows_its_rule_and_records_every_candidate():
    config = TSCConfig(**QUICK, t_select="holdout", t_grid=(0.4, 0.6, 0.8), acc_budget=5.0, holdout_fraction=0.25)
    result = purify(_model(), _data(), config=config)
    stage2 = result.history[1]
    candidates = {float(t): acc for t, acc in stage2["t_candidates"].items()}
    assert set(candidates) == {0.4, 0.6, 0.8}
    assert result.plan.curve_steps and result.history[0]["t"] == config.t_stage1
    reference = _reference_accuracy(config)
    allowed = [t for t, acc in candidates.items() if acc >= reference - config.acc_budget]
    expected = max(allowed) if allowed else max(candidates, key=lambda t: (candidates[t], -t))
    assert stage2["t"] == expected


def _reference_accuracy(config):
    """The original model's accuracy on the held-out share, recomputed the way the rule defines it."""
    data = _data()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed + 7))
    held = order[:round(config.holdout_fraction * len(data))]
    model = _model().eval()
    with torch.no_grad():
        predictions = model(data.tensors[0][held]).argmax(1)
    return float((predictions == data.tensors[1][held]).float().mean() * 100)


def test_holdout_selection_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="labelled Dataset"):
        purify(_model(), _data(), loss_fn=lambda m, b: m(b[0]).pow(2).mean(),
               config=TSCConfig(**QUICK, t_select="holdout"))
    with pytest.raises(ValueError, match="t_grid"):
        TSCConfig(t_grid=())


def test_distillation_runs_after_the_last_round_only_and_resumes_exactly(tmp_path, monkeypatch):
    config = TSCConfig(**{**QUICK, "rounds": 2}, finetune_epochs=1, distill_epochs=2)
    expected = purify(_model(), _data(), config=config)
    assert "distill_losses" not in expected.history[1] and len(expected.history[-1]["distill_losses"]) == 2
    real_save, saves = checkpoint.save, []

    def crashing_save(*args, **kwargs):
        saves.append(real_save(*args, **kwargs))
        if len(saves) == len_before_distill + 1:   # inside the distillation
            raise KeyboardInterrupt
        return saves[-1]

    # count the saves of a run up to the distillation: one per step and per epoch
    counting = []
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: counting.append(1) or real_save(*a, **k))
    purify(_model(), _data(), config=config, checkpoint_dir=tmp_path / "count", checkpoint_interval_s=0)
    len_before_distill = len(counting) - 3   # the distillation's two epochs and the final save
    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        purify(_model(), _data(), config=config, checkpoint_dir=tmp_path / "run", checkpoint_interval_s=0)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = purify(_model(), _data(), config=config, checkpoint_dir=tmp_path / "run", resume=True)
    for a, b in zip(expected.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history[-1]["distill_losses"] == expected.history[-1]["distill_losses"]
    assert math.isfinite(resumed.history[-1]["seconds"]["distill"])
