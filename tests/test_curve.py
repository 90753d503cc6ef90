"""Bezier curves, BatchNorm recalibration and batch augmentation, against direct float64 computations."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tsc_fast.models import MLP, DigitsCNN
from tsc_fast.batches import random_translate
from tsc_fast.curve import BezierCurve, ParamLayout, finetune_model, recalibrate_bn, train_curve


def _pair(cls=MLP, seed=0):
    torch.manual_seed(seed)
    return cls().eval(), cls().eval()


def test_layout_round_trip():
    a, _ = _pair()
    layout = ParamLayout(a)
    views = layout.unflatten(layout.flatten(a))
    for name, p in a.named_parameters():
        assert torch.equal(views[name], p)


def test_curve_endpoints_compute_the_end_models():
    a, b = _pair()
    curve = BezierCurve(a, b).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(curve(x, 0.0), a(x))
    torch.testing.assert_close(curve(x, 1.0), b(x))


def test_curve_point_matches_float64_bernstein_form():
    a, b = _pair()
    curve = BezierCurve(a, b)
    with torch.no_grad():
        curve.middle.add_(torch.randn_like(curve.middle))
    t = 0.3
    expected = ((1 - t) ** 2 * curve.start.double() + 2 * t * (1 - t) * curve.middle.double()
                + t * t * curve.end.double())
    point = curve.point(t)
    got = torch.cat([p.detach().reshape(-1) for p in point.parameters()]).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert not any(isinstance(m, BezierCurve) for m in point.modules())


def test_gradient_reaches_only_the_middle_point():
    a, b = _pair()
    curve = BezierCurve(a, b)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    t = 0.25
    loss = nn.functional.cross_entropy(curve(x, t), y)
    loss.backward()
    # reference: gradient w.r.t. w(t) through a plain module, times the Bernstein weight 2t(1-t)
    plain = curve.point(t)
    nn.functional.cross_entropy(plain(x), y).backward()
    grad_w = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    torch.testing.assert_close(curve.middle.grad, 2 * t * (1 - t) * grad_w, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in curve.template.parameters())


def test_endpoints_frozen_and_training_lowers_the_midpoint_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    a, b = _pair()
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    curve = BezierCurve(a, b)
    start, end = curve.start.clone(), curve.end.clone()
    with torch.no_grad():
        before = nn.functional.cross_entropy(curve(x, 0.5), y).item()
    losses = train_curve(curve, data, epochs=15, lr=0.05, progress=False)
    with torch.no_grad():
        after = nn.functional.cross_entropy(curve(x, 0.5), y).item()
    assert torch.equal(curve.start, start) and torch.equal(curve.end, end)
    assert after < 0.8 * before
    assert len(losses) == 15


def test_recalibrated_first_bn_holds_the_exact_mean_over_uneven_batches():
    torch.manual_seed(0)
    model = DigitsCNN()
    with torch.no_grad():
        model.bn1.running_mean.fill_(5.0)
    x = torch.rand(50, 1, 8, 8)
    seen = recalibrate_bn(model, DataLoader(TensorDataset(x, torch.zeros(50)), batch_size=16))
    assert seen == 50
    with torch.no_grad():
        features = model.conv1(x).double()
    expected = features.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean.double(), expected, rtol=1e-5, atol=1e-6)
    assert not model.training and model.bn1.momentum == 0.1


def test_recalibration_leaves_dropout_off():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.9), nn.Linear(8, 2))
    calls = []
    model[2].register_forward_hook(lambda m, i, o: calls.append(m.training))
    recalibrate_bn(model, [torch.randn(10, 4)])
    assert calls == [False]


def test_finetune_changes_weights_and_returns_losses():
    a, _ = _pair(DigitsCNN)
    before = copy.deepcopy(a.state_dict())
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    losses = finetune_model(a, DataLoader(TensorDataset(x, y), batch_size=8), epochs=2, lr=0.01, progress=False)
    assert len(losses) == 2
    assert not torch.equal(before["conv1.weight"], a.conv1.weight)


@pytest.mark.parametrize("shift", [1, 2])
def test_random_translate_is_a_zero_filled_shift(shift):
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5) + 1
    g = torch.Generator().manual_seed(3)
    out = random_translate(x, shift, g)
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 2 * shift + 1, (2,), generator=g) - shift
    dx = torch.randint(0, 2 * shift + 1, (2,), generator=g) - shift
    for i in range(2):
        # output pixel (r, c) reads input pixel (r + dy, c + dx), zero outside
        expected = torch.zeros_like(x[i])
        for r in range(6):
            for c in range(5):
                rr, cc = r + int(dy[i]), c + int(dx[i])
                if 0 <= rr < 6 and 0 <= cc < 5:
                    expected[:, r, c] = x[i, :, rr, cc]
        assert torch.equal(out[i], expected)
    assert torch.equal(random_translate(x, 0), x)
