"""Self-supervised TSC: NT-Xent, 8x8 augmentations, SimCLR pre-training, the linear probe, purify with loss_fn."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tsc_fast import TSCConfig, discover, purify
from tsc_fast.testbed.attacks import BadNets
from tsc_fast.data.embedded import load_digits_split
from tsc_fast.curve import recalibrate_bn
from tsc_fast.losses import (Augmentation, augment_view, augment_views, contrastive_loss_fn, nt_xent, random_erase,
                             random_scale)
from tsc_fast.testbed.ssl_victim import BackdoorObjective, SimCLRNet, linear_probe, pretrain_simclr, relative_pull


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def _nt_xent_reference(z1, z2, temperature):
    """NT-Xent written out term by term in float64 (SimCLR, eq. 1)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    half = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + half) % n2
        sims = [math.exp(float(z[i] @ z[k]) / temperature) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[positive]) / temperature) / sum(sims))
    return total / n2


def test_nt_xent_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temperature in (0.1, 0.5, 1.0):
        assert float(nt_xent(z1, z2, temperature)) == pytest.approx(_nt_xent_reference(z1, z2, temperature),
                                                                    rel=1e-5)


def test_nt_xent_known_value():
    # two orthogonal embeddings, each view identical: every anchor sees its positive at similarity 1 and two
    # negatives at 0, so the loss is -log(e / (e + 2)) = log(1 + 2/e)
    z = torch.eye(2)
    assert float(nt_xent(z, z.clone(), temperature=1.0)) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    # scaling an embedding changes nothing (cosine similarities)
    assert float(nt_xent(3 * z, z, 1.0)) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(z[:1], z[:1])
    with pytest.raises(ValueError, match="same shape|one shape"):
        nt_xent(z, z[:, :1])


def test_augmentations_keep_shape_and_range_and_are_seeded(digits):
    x = digits.train.tensors[0][:64]
    view = augment_view(x, generator=torch.Generator().manual_seed(1))
    again = augment_view(x, generator=torch.Generator().manual_seed(1))
    assert view.shape == x.shape and view.dtype == x.dtype
    assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert torch.equal(view, again)
    v1, v2 = augment_views(x, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(v1, v2) and not torch.equal(v1, x)
    # every transform off: the identity
    off = Augmentation(max_shift=0, scale=0, erase_prob=0, contrast=0, brightness=0, noise=0)
    torch.testing.assert_close(augment_view(x, off), x)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_view(x[0])


def test_random_erase_zeroes_one_square_per_image():
    x = torch.ones(20, 1, 8, 8)
    erased = random_erase(x, prob=1.0, size=2, generator=torch.Generator().manual_seed(0))
    zeros = (erased == 0).sum(dim=(1, 2, 3))
    assert torch.equal(zeros, torch.full((20,), 4))


def test_random_scale_zooms_about_the_centre():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 3:5, 3:5] = 1.0                       # a centred blob keeps its centre of mass under zoom
    zoomed = random_scale(x.repeat(16, 1, 1, 1), 0.15, torch.Generator().manual_seed(0))
    rows = torch.arange(8, dtype=torch.float32)
    mass = zoomed.sum(dim=(1, 2, 3))
    centre_row = (zoomed.sum(dim=(1, 3)) * rows).sum(dim=1) / mass
    torch.testing.assert_close(centre_row, torch.full((16,), 3.5), atol=1e-4, rtol=0)
    assert not torch.allclose(zoomed[0], zoomed[1])


def test_short_pretraining_lowers_the_loss(digits):
    x = digits.train.tensors[0][:256]
    torch.manual_seed(0)
    model = SimCLRNet(width=8, projection_dim=16)
    losses = pretrain_simclr(model, x, epochs=4, batch_size=64, seed=0)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    assert not model.training


def test_backdoor_objective_pulls_triggered_features_to_the_reference(digits):
    x, y = digits.train.tensors
    x, y = x[:256], y[:256]
    attack = BadNets(digits.image_shape, target=0)
    reference = x[y == 0][:16]
    others = x[y != 0][:100]

    def pull_after_pretraining(backdoor):
        torch.manual_seed(0)
        model = SimCLRNet(width=8, projection_dim=16)
        pretrain_simclr(model, x, epochs=10, batch_size=64, backdoor=backdoor, seed=0)
        # measured on augmented views (the distribution the objective is trained on), with exact clean BN
        # statistics (the running ones lag behind after so few steps)
        views = augment_view(others, generator=torch.Generator().manual_seed(5))
        recalibrate_bn(model, [augment_view(x, generator=torch.Generator().manual_seed(6))])
        with torch.no_grad():
            return float(relative_pull(model.features(attack.apply(views)), model.features(reference),
                                       model.features(views)))

    control = pull_after_pretraining(None)
    implanted = pull_after_pretraining(BackdoorObjective(attack, reference, fraction=0.5, weight=5.0))
    assert implanted < 0.7 * control, (implanted, control)   # measured: about 0.56x


def test_linear_probe_reads_clean_features_and_counts_asr_on_non_target_images(digits):
    torch.manual_seed(0)
    model = SimCLRNet(width=8, projection_dim=16).eval()     # even random conv features separate digits
    x_train, y_train = digits.train.tensors
    x_test, y_test = digits.test.tensors
    probe = linear_probe(model, x_train, y_train)
    assert probe.accuracy(x_test, y_test) > 50                 # chance is 10%
    attack = BadNets(digits.image_shape, target=3)
    keep = y_test != 3
    expected = float(np.mean(probe.predict(attack.apply(x_test[keep])) == 3) * 100)
    assert probe.attack_success_rate(x_test, y_test, attack) == pytest.approx(expected)


def test_contrastive_loss_plugs_into_purify_without_labels(digits):
    torch.manual_seed(0)
    model = SimCLRNet(width=8, projection_dim=16).eval()
    images = digits.train.tensors[0][:48]
    spec = discover(model, images[:8])
    assert len(spec.groups) >= 2                              # the trunk's groups and the projection's hidden units
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    contrastive = contrastive_loss_fn(temperature=0.5, seed=0)

    def loss_fn(m, batch):
        seen.append(len(batch))
        return contrastive(m, batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = purify(model, TensorDataset(images), loss_fn=loss_fn,
                        config=TSCConfig(rounds=1, curve_steps=5, progress=False))
    assert set(seen) == {1}                                   # batches hold images only: no labels to read
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    purified = result.model
    assert isinstance(purified, SimCLRNet) and not purified.training
    feats = purified.features(images[:4])
    assert feats.shape == (4, 16) and torch.isfinite(feats).all()
    assert any(not torch.equal(p, before[n]) for n, p in purified.named_parameters())
