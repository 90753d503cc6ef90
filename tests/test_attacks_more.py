"""BPP, Low Frequency, SIG, label-consistent, WaNet and Input-aware attacks."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tsc_fast.testbed.attacks import (
    BPP,
    SIG,
    InputAware,
    LabelConsistent,
    LowFrequency,
    PoisonedSet,
    WaNet,
    build_attack,
    floyd_steinberg,
    pgd_away_from_labels,
    poison_dataset,
    DIGITS_ATTACK_OPTIONS,
)
from tsc_fast.data.embedded import load_digits_split
from tsc_fast.models import build_classifier
from tsc_fast.testbed.victims import make_backdoored_digits, train_classifier

@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def fitted_input_aware(digits):
    x, y = digits.train_tensors()
    return InputAware((1, 8, 8), target=0, mask_steps=20, train_steps=20, batch_size=64).fit(x[:300], y[:300])


@pytest.fixture(scope="module")
def surrogate(digits):
    x, y = digits.train_tensors()
    model = build_classifier("cnn", (1, 8, 8), 10, seed=0)
    return train_classifier(model, x, y, epochs=2, seed=0, progress=False)


def make_attack(name, shape, fitted_input_aware=None, **options):
    if name == "input_aware":
        return fitted_input_aware
    return build_attack(name, shape, **options)


# --- shared properties ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bpp", "lf", "sig", "lc", "wanet", "input_aware"])
def test_trigger_keeps_shape_range_and_input(name, fitted_input_aware):
    shape = (1, 8, 8) if name == "input_aware" else (3, 9, 7)
    torch.manual_seed(0)
    x = torch.rand(6, *shape)
    before = x.clone()
    attack = make_attack(name, shape, fitted_input_aware)
    out = attack.apply(x)
    assert torch.equal(x, before), "apply must not modify its input"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x), "the trigger must change the images"
    torch.testing.assert_close(attack.apply(x[2]), out[2], rtol=0, atol=1e-6)  # one image without batch axis
    with pytest.raises(ValueError, match="shape"):
        attack.apply(torch.rand(2, shape[0] + 1, *shape[1:]))


@pytest.mark.parametrize("name", ["bpp", "lf", "wanet", "input_aware"])
@pytest.mark.parametrize("rate", [0.1, 0.05, 0.01])
def test_dirty_label_poisoning_count_labels_and_determinism(name, rate, digits, fitted_input_aware):
    x, y = digits.train_tensors()
    x_before, y_before = x.clone(), y.clone()
    attack = make_attack(name, (1, 8, 8), fitted_input_aware, target=3)
    poisoned = poison_dataset(x, y, attack, rate=rate, seed=5)
    xp, yp, index = poisoned
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert len(index) == math.floor(rate * len(y) + 0.5) and len(torch.unique(index)) == len(index)
    assert torch.all(yp[index] == attack.target)
    torch.testing.assert_close(xp[index], attack.apply(x[index]), rtol=0, atol=1e-6)
    cross = poisoned.cross_index
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[index] = False
    untouched[cross] = False
    assert torch.equal(xp[untouched], x[untouched]) and torch.equal(yp[untouched], y[untouched])
    again = poison_dataset(x, y, attack, rate=rate, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(poisoned, again)) and torch.equal(cross, again.cross_index)
    assert not torch.equal(index, poison_dataset(x, y, attack, rate=rate, seed=6)[2])


@pytest.mark.parametrize("name", ["sig", "lc"])
@pytest.mark.parametrize("rate", [0.1, 0.05, 0.01])
def test_clean_label_poisoning_touches_only_target_images_and_keeps_labels(name, rate, digits, surrogate):
    x, y = digits.train_tensors()
    x_before = x.clone()
    attack = build_attack(name, (1, 8, 8), target=4, **({"surrogate": surrogate} if name == "lc" else {}))
    assert attack.clean_label
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xp, yp, index = poison_dataset(x, y, attack, rate=rate, seed=1)
    n_target = int((y == 4).sum())
    wanted = math.floor(rate * len(y) + 0.5)
    assert len(index) == min(wanted, n_target) and torch.all(y[index] == 4)
    assert (len(caught) > 0) == (wanted > n_target), "a capped count must warn"
    assert torch.equal(yp, y) and torch.equal(x, x_before)
    others = torch.ones(len(y), dtype=torch.bool)
    others[index] = False
    assert torch.equal(xp[others], x[others]) and not torch.equal(xp[index], x[index])
    assert torch.equal(xp, poison_dataset(x, y, attack, rate=rate, seed=1)[0])
    with pytest.raises(ValueError, match="clean-label"):
        poison_dataset(x, y, attack, rate=rate, exclude_target=True)


def test_registry_knows_every_attack_and_alias():
    for name, cls in [("bpp", BPP), ("lf", LowFrequency), ("low-frequency", LowFrequency), ("sig", SIG),
                      ("lc", LabelConsistent), ("label_consistent", LabelConsistent), ("wanet", WaNet),
                      ("input_aware", InputAware), ("IAD", InputAware)]:
        attack = build_attack(name, (1, 8, 8), target=2)
        assert isinstance(attack, cls) and attack.target == 2
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("trojannn", (1, 8, 8))


# --- BPP --------------------------------------------------------------------------------------------------------


def floyd_steinberg_reference(image: np.ndarray, levels: int) -> np.ndarray:
    """Textbook per-pixel Floyd-Steinberg on one (H, W) channel, float64 scalars."""
    work = image.astype(np.float64).copy()
    h, w = work.shape
    out = np.zeros_like(work)
    for i in range(h):
        for j in range(w):
            old = work[i, j]
            new = min(max(round(old * (levels - 1)), 0), levels - 1) / (levels - 1)
            out[i, j] = new
            err = old - new
            for di, dj, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    work[i + di, j + dj] += err * weight / 16
    return out


@pytest.mark.parametrize("bits", [1, 3])
def test_bpp_dithering_matches_textbook_reference(bits):
    torch.manual_seed(bits)
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    levels = 2**bits
    out = floyd_steinberg(x, levels)
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(out[n, c].numpy(), floyd_steinberg_reference(x[n, c].numpy(), levels), atol=1e-12)
    on_grid = out * (levels - 1)
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-9)
    plain = BPP((3, 5, 7), bits=bits, dither=False).apply(x.float())
    torch.testing.assert_close(plain, torch.round(x.float() * (levels - 1)) / (levels - 1))
    with pytest.raises(ValueError, match="bits"):
        BPP((1, 8, 8), bits=0)


# --- Low Frequency ----------------------------------------------------------------------------------------------


def test_low_frequency_pattern_is_band_limited_budgeted_and_seeded():
    attack = LowFrequency((3, 32, 32), epsilon=0.05, pattern_seed=3)
    assert attack.max_frequency == 4
    pattern = attack.pattern.double()
    assert float(pattern.abs().max()) == pytest.approx(0.05, rel=1e-6)
    spectrum = torch.fft.fft2(pattern).abs()
    freq = (torch.fft.fftfreq(32) * 32).abs()
    outside = (freq[:, None] > 4) | (freq[None, :] > 4)
    assert float(spectrum[:, outside].max()) < 1e-6 * float(spectrum.max())
    assert float(spectrum[:, 0, 0].max()) < 1e-6 * float(spectrum.max()), "no constant offset"
    assert torch.equal(attack.pattern, LowFrequency((3, 32, 32), epsilon=0.05, pattern_seed=3).pattern)
    assert not torch.equal(attack.pattern, LowFrequency((3, 32, 32), epsilon=0.05, pattern_seed=4).pattern)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(attack.apply(x), (x + attack.pattern).clamp(0, 1))


# --- SIG --------------------------------------------------------------------------------------------------------


def test_sig_signal_matches_formula_for_training_and_test():
    attack = SIG((3, 6, 10), target=1, delta=0.1, frequency=3, test_delta=0.2)
    x = torch.full((2, 3, 6, 10), 0.5)
    columns = np.arange(10)
    expected_test = 0.5 + 0.2 * np.sin(2 * np.pi * columns * 3 / 10)
    np.testing.assert_allclose(attack.apply(x)[1, 2, 4].numpy(), expected_test, atol=1e-6)
    y = torch.tensor([1, 0])
    xp, yp, index = attack.poison(x, y, rate=0.5)
    assert index.tolist() == [0] and torch.equal(yp, y)
    np.testing.assert_allclose(xp[0, 0, 0].numpy(), 0.5 + 0.1 * np.sin(2 * np.pi * columns * 3 / 10), atol=1e-6)
    assert torch.equal(xp[1], x[1])


# --- label-consistent -------------------------------------------------------------------------------------------


def test_pgd_raises_the_loss_within_the_budget(digits, surrogate):
    x, y = digits.train_tensors()
    x, y = x[:64], y[:64]
    adv = pgd_away_from_labels(surrogate, x, y, epsilon=0.1, steps=5, step_size=0.03)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(surrogate(adv), y) > F.cross_entropy(surrogate(x), y) + 0.1
    assert not surrogate.training


def test_label_consistent_trigger_and_surrogate_paths(digits, surrogate):
    attack = LabelConsistent((1, 8, 8), target=0, surrogate_epochs=1)
    mask = attack.mask
    assert int(mask.sum()) == 16 and mask[0, 0] == 1 and mask[7, 7] == 1 and mask[3:5, 3:5].sum() == 0
    x = torch.zeros(1, 1, 8, 8)
    assert torch.equal(attack.apply(x)[0, 0], attack.pattern * mask)
    xs, ys = digits.train_tensors()
    xs, ys = xs[:200], ys[:200]
    with_given = attack.poison(xs, ys, rate=0.05, seed=0, surrogate=surrogate)
    trained = attack.poison(xs, ys, rate=0.05, seed=0)  # trains its own surrogate
    no_pgd = LabelConsistent((1, 8, 8), target=0, pgd_steps=0).poison(xs, ys, rate=0.05, seed=0)
    index = with_given.index
    assert torch.equal(index, trained.index) and torch.equal(index, no_pgd.index)
    assert torch.equal(no_pgd.x[index], attack.apply(xs[index]))
    for poisoned in (with_given, trained):
        outside = ~mask.bool()
        change = (poisoned.x[index] - xs[index])[:, :, outside]
        assert float(change.abs().max()) <= attack.epsilon + 1e-6 and float(change.abs().max()) > 0


# --- WaNet ------------------------------------------------------------------------------------------------------


def test_wanet_zero_strength_is_identity_and_warp_is_smooth_and_seeded():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 12, 12)
    torch.testing.assert_close(WaNet((2, 12, 12), strength=0.0).apply(x), x, rtol=0, atol=1e-6)
    attack = WaNet((2, 12, 12), strength=1.0, field_seed=1)
    identity = WaNet((2, 12, 12), strength=0.0).grid
    displacement = (attack.grid - identity) * 12 / 2  # in pixels
    assert 0.05 < float(displacement.abs().mean()) < 1.5
    assert torch.equal(attack.grid, WaNet((2, 12, 12), strength=1.0, field_seed=1).grid)
    assert not torch.equal(attack.grid, WaNet((2, 12, 12), strength=1.0, field_seed=2).grid)
    # a horizontal ramp image: the warped value tells where each pixel sampled from
    ramp = torch.linspace(0, 1, 12).expand(1, 2, 12, 12).contiguous()
    sampled = attack.apply(ramp)[0, 0]
    inside = (attack.grid[..., 0].abs() < 1) & (attack.grid[..., 1].abs() < 1)
    torch.testing.assert_close(sampled[inside], ((attack.grid[..., 0] + 1) / 2)[inside], rtol=0, atol=1e-5)


def test_wanet_noise_mode_keeps_labels(digits):
    x, y = digits.train_tensors()
    attack = WaNet((1, 8, 8), target=1, cross_ratio=2.0)
    poisoned = attack.poison(x, y, rate=0.05, seed=0)
    cross = poisoned.cross_index
    assert isinstance(poisoned, PoisonedSet) and len(cross) == 2 * len(poisoned.index)
    assert not set(cross.tolist()) & set(poisoned.index.tolist())
    assert torch.equal(poisoned.y[cross], y[cross])
    assert torch.equal(poisoned.x[cross], attack.noise_warp(x[cross], seed=0))
    assert not torch.allclose(poisoned.x[cross], attack.apply(x[cross]))


# --- Input-aware ------------------------------------------------------------------------------------------------


def test_input_aware_triggers_are_input_specific_seeded_and_sparse(digits, fitted_input_aware):
    x, y = digits.train_tensors()
    attack = fitted_input_aware
    triggered = attack.apply(x[:10])
    patterns = attack.pattern_generator(x[:10])
    assert (patterns[0] - patterns[1]).abs().max() > 1e-3, "different inputs must get different patterns"
    masks = attack.mask_generator(x[:200])
    assert float(masks.mean()) < 2 * attack.mask_density
    again = InputAware((1, 8, 8), target=0, mask_steps=20, train_steps=20, batch_size=64).fit(x[:300], y[:300])
    assert torch.equal(again.apply(x[:10]), triggered)
    other = InputAware((1, 8, 8), target=0, mask_steps=20, train_steps=20, batch_size=64, generator_seed=1)
    assert not torch.equal(other.fit(x[:300], y[:300]).apply(x[:10]), triggered)
    with pytest.raises(RuntimeError, match="fit"):
        InputAware((1, 8, 8)).apply(x[:2])


def test_input_aware_cross_mode(digits, fitted_input_aware):
    x, y = digits.train_tensors()
    poisoned = fitted_input_aware.poison(x, y, rate=0.05, seed=2)
    cross = poisoned.cross_index
    assert len(cross) == len(poisoned.index) and not set(cross.tolist()) & set(poisoned.index.tolist())
    assert torch.equal(poisoned.y[cross], y[cross])
    own = fitted_input_aware.apply(x[cross])
    assert not torch.allclose(poisoned.x[cross], own), "cross images carry another image's trigger"


# --- the backdoor is really implanted ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bpp", "lf", "sig", "lc", "wanet", "input_aware"])
def test_attack_implants_on_digits(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clean-label rate capped at the target class size
        setup = make_backdoored_digits(attack=name, rate=0.1, seed=0, epochs=12, progress=False,
                                       attack_options=DIGITS_ATTACK_OPTIONS[name])
    assert setup.before["acc"] >= 85, setup.before
    assert setup.before["asr"] >= 50, setup.before  # a clean model puts about 10% of triggered images in any class
