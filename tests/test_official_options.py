"""The settings that make TSCConfig.official() the official code: feature taps at raw layer outputs, statistics
and BN recalibration on augmented shuffled batches, horizontal flips for CIFAR-10, and a user's DataLoader used
as given."""
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from tsc_fast import TSCConfig, purify
from tsc_fast.models import DigitsCNN, PreActResNet18
from tsc_fast.batches import AugmentedBatches, BatchAugment, random_hflip, random_translate
from tsc_fast.spec import discover, forward_with_taps


def _tapped(spec):
    return {g: (t.module, t.kind) for g, t in spec.taps.items()}


def test_layer_output_taps_are_where_the_official_preact_resnet18_code_reads_features():
    spec = discover(PreActResNet18(), torch.randn(1, 3, 32, 32), tap_at="layer_output")
    taps = _tapped(spec)
    # streams: the stem conv for stage 1, then each stage's first block's conv2 (before its add)
    assert taps["layer1.stream"] == ("conv1", "output")
    for k in (2, 3, 4):
        assert taps[f"layer{k}.stream"] == (f"layer{k}.0.conv2", "output")
    # inner groups: the raw conv output, before BN and ReLU
    for k in (1, 2, 3, 4):
        for j in (0, 1):
            assert taps[f"layer{k}.{j}.conv1"] == (f"layer{k}.{j}.conv1", "output")


def test_layer_output_taps_of_torchvision_resnet18_skip_the_downsample_shortcut():
    model = torchvision.models.resnet18(num_classes=10)
    taps = _tapped(discover(model, torch.randn(1, 3, 32, 32), tap_at="layer_output"))
    assert taps["layer1.stream"] == ("conv1", "output")
    assert taps["layer2.stream"] == ("layer2.0.conv2", "output")   # not layer2.0.downsample.0
    default = _tapped(discover(model, torch.randn(1, 3, 32, 32)))
    assert default["layer2.0.conv1"] == ("layer2.0.relu", "output")  # ours: after BN and ReLU


def test_layer_output_features_are_the_raw_conv_outputs():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.rand(5, 1, 8, 8)
    spec = discover(model, x[:1], tap_at="layer_output")
    seen = {}
    forward_with_taps(model, spec, x, lambda g, f, axis: seen.__setitem__(g, f.clone()))
    with torch.no_grad():
        stem = model.conv1(x)
        h = torch.relu(model.bn1(stem))
        h = h + torch.relu(model.bn2(model.conv2(h)))
        conv3 = model.conv3(h)
    torch.testing.assert_close(seen["stream"], stem)
    torch.testing.assert_close(seen["conv3"], conv3)


def test_unknown_tap_point_is_refused():
    with pytest.raises(ValueError, match="tap_at"):
        discover(DigitsCNN(), torch.rand(1, 1, 8, 8), tap_at="after_bn")


def test_official_config_names_its_settings():
    official = TSCConfig.official()
    assert (official.tap_at, official.stats_augment, official.bn_batch_size) == ("layer_output", True, 256)
    assert official.augment_shift == 4 and not official.augment_flip
    assert TSCConfig.official(dataset="cifar10").augment_flip
    assert not TSCConfig.official(dataset="gtsrb").augment_flip
    plan = official.plan(72, image_size=8)                 # RandomCrop(padding=4) at every size
    assert plan.augment_shift == 4 and plan.bn_batch_size == 256
    # the paper's t* and no rotation/rescaling, whatever our defaults are
    assert (official.t_stage1, official.t_stage2) == (0.4, 0.4)
    assert (plan.augment_rotation, plan.augment_scale) == (0.0, 0.0)
    default = TSCConfig()
    assert (default.tap_at, default.stats_augment, default.augment_flip) == ("activation", False, False)
    assert default.plan(72, image_size=8).bn_batch_size == default.stats_batch_size


def test_random_hflip_mirrors_about_half_the_images():
    x = torch.rand(400, 2, 3, 5)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())                    # each image is either mirrored or untouched
    assert 160 < int(flipped.sum()) < 240


def test_batch_augment_without_flip_draws_what_the_translation_alone_draws():
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    out = BatchAugment(shift=2)((x, y), torch.Generator().manual_seed(4))
    assert torch.equal(out[0], random_translate(x, 2, torch.Generator().manual_seed(4)))
    assert out[1] is y
    assert BatchAugment()((x, y)) == (x, y)


def test_augmented_batches_repeat_per_pass_and_differ_between_passes():
    data = [(torch.rand(4, 1, 8, 8), torch.arange(4)) for _ in range(3)]
    batches = AugmentedBatches(data, BatchAugment(shift=2, flip=True), seed=3)
    first = [b[0] for b in batches]
    again = [b[0] for b in batches]
    batches.set_epoch(1)
    other = [b[0] for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert len(batches) == 3


def test_a_users_dataloader_is_used_as_given_without_added_augmentation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the defaults say nothing: they only apply where we make the batches
        loader_plan = TSCConfig().plan(72, image_size=8, loader_batch_size=24)
    assert (loader_plan.augment_shift, loader_plan.augment_flip, loader_plan.batch_size) == (0, False, 24)
    assert (loader_plan.augment_rotation, loader_plan.augment_scale) == (0.0, 0.0)
    with pytest.warns(UserWarning, match="used as given"):
        TSCConfig(augment_shift=2, augment_flip=True).plan(72, image_size=8, loader_batch_size=24)
    with pytest.warns(UserWarning, match="used as given"):
        TSCConfig(augment_rotation=10.0).plan(72, image_size=8, loader_batch_size=24)


def test_default_augmentation_of_a_dataset_rotates_and_rescales_and_can_be_turned_off():
    from tsc_fast.tsc import DEFAULT_ROTATION, DEFAULT_SCALE

    plan = TSCConfig().plan(72, image_size=8)
    assert (plan.augment_rotation, plan.augment_scale) == (DEFAULT_ROTATION, DEFAULT_SCALE) != (0.0, 0.0)
    off = TSCConfig(augment_rotation=0.0, augment_scale=0.0).plan(72, image_size=8)
    assert off.augment == BatchAugment(1, False, 0.0, 0.0)


def test_no_augmentation_reaches_a_users_dataloader_batches():
    """The curve loss sees exactly the loader's images: no random shift on top of its transforms."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    data = TensorDataset(x, torch.randint(0, 10, (16,)))
    originals = {tuple(img.flatten().tolist()[:8]) for img in x}
    seen = []

    def loss_fn(model, batch):
        seen.extend(tuple(img.flatten().tolist()[:8]) for img in batch[0])
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    config = TSCConfig(rounds=1, curve_steps=2, progress=False, warn_below_steps=0)
    purify(DigitsCNN(), DataLoader(data, batch_size=8, shuffle=True), loss_fn=loss_fn, config=config)
    assert seen and set(seen) <= originals


@pytest.mark.parametrize("flip", [False, True])
def test_official_style_statistics_run_reproducibly(flip):
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    config = TSCConfig(rounds=1, curve_steps=4, batch_size=16, progress=False, warn_below_steps=0,
                       stats_augment=True, bn_batch_size=32, augment_flip=flip, tap_at="layer_output")
    model = DigitsCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = purify(model, data, config=config)
    second = purify(model, data, config=config)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    plain = purify(model, data, config=TSCConfig(rounds=1, curve_steps=4, batch_size=16, progress=False,
                                                        warn_below_steps=0, tap_at="layer_output"))
    # augmented BN passes give other running statistics than the plain ordered pass
    assert not torch.equal(first.model.bn1.running_mean, plain.model.bn1.running_mean)


def test_random_rotate_scale_is_the_identity_at_zero_and_reproducible_otherwise():
    from tsc_fast.batches import random_rotate_scale

    x = torch.rand(6, 2, 8, 8)
    torch.testing.assert_close(random_rotate_scale(x, 0.0, 0.0, torch.Generator().manual_seed(0)), x)
    a = random_rotate_scale(x, 15.0, 0.1, torch.Generator().manual_seed(1))
    b = random_rotate_scale(x, 15.0, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6


def test_batch_augment_with_affine_parts_changes_only_the_images():
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    out = BatchAugment(shift=1, rotation=10.0, scale=0.1)((x, y), torch.Generator().manual_seed(2))
    assert out[1] is y and out[0].shape == x.shape and not torch.equal(out[0], x)
    plan = TSCConfig(augment_rotation=10.0, augment_scale=0.1).plan(72, image_size=8)
    assert plan.augment == BatchAugment(1, False, 10.0, 0.1)
