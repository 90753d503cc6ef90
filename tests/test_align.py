"""Statistics and alignment: float64 references, known optima (undoing a permutation), function preserved."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tsc_fast import discover, permute
from tsc_fast.align import FunctionChangedError, realign, unalign, verify_same_function
from tsc_fast.models import MLP, DigitsCNN, PreActResNet18
from tsc_fast.curve import recalibrate_bn
from tsc_fast.spec import forward_with_taps
from tsc_fast.stats import cross_correlations, self_correlations

from _helpers import randomise_bn


def _setup(cls=DigitsCNN, n=45, shape=(1, 8, 8), batch=16, seed=0):
    torch.manual_seed(seed)
    model = randomise_bn(cls())
    x = torch.rand(n, *shape)
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch)
    return model, x, loader, discover(model, x[:2])


def _all_features(model, spec, x):
    """Every group's features for all of x in one forward, as float64 (samples, channels)."""
    out = {}

    def keep(group, f, axis):
        out[group] = f.detach().movedim(axis, -1).reshape(-1, f.shape[axis]).double()

    with torch.no_grad():
        forward_with_taps(model.eval(), spec, x, keep)
    return out


def _pearson(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = torch.outer(a.norm(dim=0), b.norm(dim=0))
    return torch.where(denom > 0, (a.T @ b) / denom, torch.zeros_like(denom))


@pytest.mark.parametrize("cls,shape", [(DigitsCNN, (1, 8, 8)), (MLP, (1, 8, 8))])
def test_streamed_self_correlation_matches_float64_reference(cls, shape):
    model, x, loader, spec = _setup(cls, shape=shape)
    got = self_correlations(model, spec, loader)
    features = _all_features(model, spec, x)
    assert set(got) == set(spec.groups)
    for g, f in features.items():
        torch.testing.assert_close(got[g], _pearson(f, f), rtol=1e-6, atol=1e-8)


def test_streamed_cross_correlation_matches_float64_reference():
    model, x, loader, spec = _setup()
    torch.manual_seed(1)
    other = randomise_bn(DigitsCNN(), seed=1)
    got = cross_correlations(model, other, spec, loader)
    fa, fb = _all_features(model, spec, x), _all_features(other, spec, x)
    for g in spec.groups:
        torch.testing.assert_close(got[g], _pearson(fa[g], fb[g]), rtol=1e-6, atol=1e-8)


def test_second_moment_objective_is_uncentred_mean_product():
    model, x, loader, spec = _setup()
    got = self_correlations(model, spec, loader, objective="second_moment")
    for g, f in _all_features(model, spec, x).items():
        torch.testing.assert_close(got[g], f.T @ f / len(f), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="objective"):
        self_correlations(model, spec, loader, objective="cosine")


@pytest.mark.parametrize("cls,shape", [(DigitsCNN, (1, 8, 8)), (PreActResNet18, (3, 8, 8))])
def test_realign_undoes_a_random_permutation(cls, shape):
    model, x, loader, spec = _setup(cls, n=24, shape=shape, batch=12)
    recalibrate_bn(model, loader)   # realistic BN statistics: no dead units, so the optimum is unique
    rng = np.random.default_rng(0)
    scrambled = permute(model, spec, {g: rng.permutation(n) for g, n in spec.groups.items()})
    result = realign(scrambled, model, spec, loader)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], value, msg=name)
    for g in spec.groups:   # the identity-to-reference matching is perfect: every unit correlates 1 with its twin
        assert result.cost_achieved[g] == pytest.approx(spec.groups[g], rel=1e-6)


def test_unalign_lowers_correlation_and_keeps_the_function():
    model, x, loader, spec = _setup()
    result = unalign(model, spec, loader)
    for g in spec.groups:
        assert result.cost_achieved[g] < 0.5 * result.cost_identity[g]
        assert sorted(result.perms[g].tolist()) == list(range(spec.groups[g]))
    verify_same_function(model, result.model, x, rtol=1e-5)
    assert set(result.seconds) >= {"stats", "assign", "permute"}


def test_verify_same_function_detects_a_change():
    model, x, _, _ = _setup()
    torch.manual_seed(3)
    with pytest.raises(FunctionChangedError, match="relative error"):
        verify_same_function(model, randomise_bn(DigitsCNN(), seed=3), x)
