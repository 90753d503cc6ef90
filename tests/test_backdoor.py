"""Data, attacks, metrics and victim training of tsc_fast.backdoor."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, Subset, TensorDataset

from tsc_fast.testbed.attacks import (
    BadNets,
    Blended,
    build_attack,
    choose_poison_indices,
    poison_dataset,
    triggered_test_set,
)
from tsc_fast.data import load_dataset, load_digits_split
from tsc_fast.data.splits import clean_subset, subset_indices, subset_size, to_tensors
from tsc_fast.metrics import evaluate, predict
from tsc_fast.models import build_classifier
from tsc_fast.testbed.victims import make_backdoored_digits, train_classifier


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def sorted_rows(images: np.ndarray) -> np.ndarray:
    rows = images.reshape(len(images), -1)
    return rows[np.lexsort(rows.T[::-1])]


# --- data -------------------------------------------------------------------------------------------------------


def test_digits_split_sizes_types_and_range(digits):
    x_train, y_train = digits.train_tensors()
    x_test, y_test = digits.test_tensors()
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10


def test_digits_split_partitions_the_dataset_and_is_stratified(digits):
    bunch = load_digits()
    x_all = torch.cat([digits.train.tensors[0], digits.test.tensors[0]]).numpy()
    np.testing.assert_array_equal(sorted_rows(x_all * 16), sorted_rows(bunch.images.astype(np.float32)))
    full_counts = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(digits.test.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - full_counts * 360 / len(bunch.target)) <= 1)


def test_digits_split_is_seeded():
    a, b, c = load_digits_split(seed=0), load_digits_split(seed=0), load_digits_split(seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_load_dataset_names():
    assert load_dataset("digits").name == "digits"
    with pytest.raises(ValueError, match="not yet supported"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("/some/folder")


def test_subset_size_rounding():
    assert subset_size(1437, 0.05) == 72  # 71.85
    assert subset_size(1437, 0.10) == 144  # 143.7
    assert subset_size(10, 0.25) == 3  # 2.5 rounds up
    assert subset_size(10, 0.01) == 1  # never empty
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subset_size(10, bad)


def test_clean_subset_fraction_membership_and_seed(digits):
    x, y = digits.train_tensors()
    xs, ys = clean_subset((x, y), 0.05, seed=3)
    assert len(xs) == len(ys) == 72
    index = subset_indices(y, 0.05, seed=3)
    assert len(np.unique(index)) == 72
    assert torch.equal(xs, x[torch.from_numpy(index)]) and torch.equal(ys, y[torch.from_numpy(index)])
    assert np.array_equal(index, subset_indices(y, 0.05, seed=3))
    assert not np.array_equal(index, subset_indices(y, 0.05, seed=4))


def test_clean_subset_class_balanced(digits):
    _, y = digits.train_tensors()
    index = subset_indices(y, 0.05, seed=0, class_balanced=True)
    counts = np.bincount(y.numpy()[index], minlength=10)
    assert counts.sum() == 72 and counts.max() - counts.min() <= 1


def test_class_balanced_moves_picks_a_small_class_cannot_fill():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    index = subset_indices(labels, 0.5, seed=0, class_balanced=True)  # 51 picks, class 0 holds only 2
    counts = np.bincount(labels[index])
    assert counts[0] == 2 and sorted(counts[1:].tolist()) == [24, 25]


class ListDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_clean_subset_and_to_tensors_keep_dataset_kinds(digits):
    x, y = digits.train_tensors()
    assert isinstance(clean_subset(digits.train, 0.1), TensorDataset)
    generic = ListDataset(x[:50], y[:50])
    subset = clean_subset(generic, 0.2, seed=1)
    assert isinstance(subset, Subset) and len(subset) == 10
    xs, ys = to_tensors(subset)
    index = torch.from_numpy(subset_indices(y[:50], 0.2, seed=1))
    assert torch.equal(xs, x[index]) and torch.equal(ys, y[index])
    assert to_tensors(digits.train)[0] is digits.train.tensors[0]


# --- attacks ----------------------------------------------------------------------------------------------------


def test_badnets_default_patch_scales_with_image_size():
    assert BadNets((1, 8, 8)).patch_size == 2
    assert BadNets((3, 32, 32)).patch_size == 3


def test_badnets_stamps_bottom_right_patch_only():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8) * 0.5
    before = x.clone()
    out = BadNets((1, 8, 8)).apply(x)
    assert torch.equal(x, before), "apply must not modify its input"
    assert torch.all(out[:, :, 6:8, 6:8] == 1.0)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[6:8, 6:8] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])


@pytest.mark.parametrize(
    "position, rows, cols",
    [("top_left", slice(1, 4), slice(1, 4)), ("bottom_left", slice(9, 12), slice(1, 4)), ((2, 5), slice(2, 5),
                                                                                           slice(5, 8))],
)
def test_badnets_positions_and_channel_values(position, rows, cols):
    attack = BadNets((3, 13, 12), patch_size=3, position=position, margin=1, value=(1.0, 0.0, 0.5))
    out = attack.apply(torch.full((3, 13, 12), 0.25))  # one image without batch axis
    expected = torch.full((3, 13, 12), 0.25)
    expected[:, rows, cols] = torch.tensor([1.0, 0.0, 0.5])[:, None, None]
    assert torch.equal(out, expected)


def test_badnets_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="does not fit"):
        BadNets((1, 8, 8), position=(7, 7))
    with pytest.raises(ValueError, match="position"):
        BadNets((1, 8, 8), position="middle")
    with pytest.raises(ValueError, match="image_shape"):
        BadNets((8, 8))
    with pytest.raises(ValueError, match="shape"):
        BadNets((1, 8, 8)).apply(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="float"):
        BadNets((1, 8, 8)).apply(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_blended_matches_formula_and_is_seeded():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 5, 7)
    before = x.clone()
    attack = Blended((3, 5, 7), alpha=0.2, pattern_seed=5)
    out = attack.apply(x)
    assert torch.equal(x, before)
    expected = 0.8 * x.double() + 0.2 * attack.pattern.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert 0.0 <= float(attack.pattern.min()) and float(attack.pattern.max()) <= 1.0
    assert torch.equal(attack.pattern, Blended((3, 5, 7), pattern_seed=5).pattern)
    assert not torch.equal(attack.pattern, Blended((3, 5, 7), pattern_seed=6).pattern)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_build_attack_registry():
    attack = build_attack("blended", (1, 8, 8), target=3, alpha=0.1)
    assert isinstance(attack, Blended) and attack.target == 3 and attack.alpha == 0.1
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("nope", (1, 8, 8))


def test_poison_dataset_count_labels_and_triggers(digits):
    x, y = digits.train_tensors()
    x_before, y_before = x.clone(), y.clone()
    attack = BadNets((1, 8, 8), target=2)
    xp, yp, index = poison_dataset(x, y, attack, rate=0.1, seed=0)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert len(index) == 144 and len(torch.unique(index)) == 144  # round(143.7)
    assert torch.all(yp[index] == 2)
    assert torch.equal(xp[index], attack.apply(x[index]))
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(xp[untouched], x[untouched]) and torch.equal(yp[untouched], y[untouched])
    # BackdoorBench's all-to-one rule draws among all images, target class included
    assert torch.any(y[index] == 2)


def test_poison_dataset_seed_and_exclude_target(digits):
    _, y = digits.train_tensors()
    a = choose_poison_indices(y, target=0, rate=0.1, seed=0)
    assert torch.equal(a, choose_poison_indices(y, target=0, rate=0.1, seed=0))
    assert not torch.equal(a, choose_poison_indices(y, target=0, rate=0.1, seed=1))
    excluded = choose_poison_indices(y, target=0, rate=0.1, seed=0, exclude_target=True)
    assert len(excluded) == 144 and torch.all(y[excluded] != 0)
    with pytest.raises(ValueError, match="candidates"):
        choose_poison_indices(y, target=0, rate=0.95, exclude_target=True)
    with pytest.raises(ValueError, match="rate"):
        choose_poison_indices(y, target=0, rate=1.5)


def test_triggered_test_set_keeps_only_non_target_images(digits):
    x, y = digits.test_tensors()
    xt, yt = triggered_test_set(x, y, BadNets((1, 8, 8), target=4))
    assert len(yt) == int((y != 4).sum()) and torch.all(yt != 4)
    assert torch.all(xt[:, :, 6:8, 6:8] == 1.0)


# --- metrics ----------------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """Predicts the class stored in pixel (0, 0) of a clean image and in pixel (0, 1) of a triggered one."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.saw_grad_enabled = []
        self.saw_training = []

    def forward(self, x):
        self.saw_grad_enabled.append(torch.is_grad_enabled())
        self.saw_training.append(self.training)
        triggered = (x[:, 0, 6:8, 6:8] == 1.0).flatten(1).all(dim=1)
        label = torch.where(triggered, x[:, 0, 0, 1], x[:, 0, 0, 0]).round().long()
        return nn.functional.one_hot(label, 10).float() + self.dummy


def scripted_test_set():
    y = torch.arange(10).repeat(2)  # 20 images, 18 of them not of the target class 0
    clean_prediction = y.clone()
    clean_prediction[[1, 5, 12, 19]] = (y[[1, 5, 12, 19]] + 1) % 10  # 16 of 20 correct -> ACC 80
    non_target = torch.nonzero(y != 0).flatten()
    triggered_prediction = y.clone()
    triggered_prediction[non_target[:9]] = 0  # 9 of 18 hit the target -> ASR 50
    triggered_prediction[non_target[9:12]] = (y[non_target[9:12]] % 9) + 1  # 3 wrong, not the target
    # the remaining 6 keep their true label -> RA 6/18
    x = torch.zeros(20, 1, 8, 8)
    x[:, 0, 0, 0] = clean_prediction.float()
    x[:, 0, 0, 1] = triggered_prediction.float()
    return x, y


@pytest.mark.parametrize("batch_size", [3, 512])
def test_evaluate_uses_backdoorbench_definitions(batch_size):
    x, y = scripted_test_set()
    model = ScriptedModel().train()
    metrics = evaluate(model, x, y, BadNets((1, 8, 8), target=0), batch_size=batch_size)
    assert metrics["acc"] == pytest.approx(80.0)
    assert metrics["asr"] == pytest.approx(50.0)
    assert metrics["ra"] == pytest.approx(100 * 6 / 18)
    assert model.training, "evaluate must restore the training mode"
    assert not any(model.saw_grad_enabled) and not any(model.saw_training)


def test_predict_matches_argmax():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(11, 6)
    assert torch.equal(predict(model, x, batch_size=4), model(x).argmax(1))


# --- training ---------------------------------------------------------------------------------------------------


def test_short_training_reaches_high_clean_accuracy(digits):
    x, y = digits.train_tensors()
    x_test, y_test = digits.test_tensors()
    model = build_classifier("cnn", (1, 8, 8), 10, seed=0)
    rng_state = torch.random.get_rng_state()
    train_classifier(model, x, y, epochs=6, seed=0, progress=False)
    assert torch.equal(rng_state, torch.random.get_rng_state()), "training must not consume the global RNG"
    assert not model.training
    accuracy = (predict(model, x_test) == y_test).float().mean().item()
    assert accuracy >= 0.93


def test_training_is_deterministic_for_a_seed(digits):
    x, y = digits.train_tensors()
    x, y = x[:200], y[:200]

    def trained(seed):
        model = build_classifier("mlp", (1, 8, 8), 10, seed=0)
        return train_classifier(model, x, y, epochs=2, seed=seed, progress=False).state_dict()

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_make_backdoored_digits_plants_a_backdoor(attack):
    setup = make_backdoored_digits(attack=attack, seed=0, epochs=8, progress=False)
    assert setup.before["acc"] >= 90 and setup.before["asr"] >= 80
    assert setup.before == setup.evaluate()
    assert len(setup.poisoned_index) == 144 and torch.all(setup.y_poisoned[setup.poisoned_index] == 0)
    clean = setup.clean_subset(0.05, seed=0)
    assert len(clean) == 72
    assert torch.equal(clean.tensors[0], setup.x_train[torch.from_numpy(subset_indices(setup.y_train, 0.05))])
