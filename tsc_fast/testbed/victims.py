"""Training the victim: a plain classifier trainer and the backdoored models the demo and benchmarks use, on the
8x8 digits and on 28x28 MNIST.

Victim recipes (:data:`VICTIM_DATASETS`; Adam, lr 3e-3, batch 64, no augmentation, cross-entropy):

- digits (docs/calibration.md): 1437 training images, ``DigitsCNN`` (``cnn``), 40 epochs. ACC above 99% and ASR
  100% for BadNets in about 5 s on a 2-core CPU.
- mnist: the 4000 training images of ``tsc_fast.data.load_mnist_split``, ``MnistCNN`` (``mnist_cnn``, 26.7k
  parameters), 20 epochs (63 batches each). Seed 0: a clean model reaches ACC 98.1 on the 1000 test images;
  BadNets (3x3 patch, 10%) ACC 98.0 / ASR 100 (ACC per epoch from epoch 5 between 97.0 and 98.1; 97.1 at epoch 15,
  so 20 rather than 15); every attack's figures are in ``tsc_fast.testbed.attacks``. Training takes about 32-35 s
  on one thread of a 2-core machine that others share (1.6-1.8 s per epoch; 64 s when it was heavily loaded).
  A default TSC run on the BadNets victim with 200 clean images (3 rounds, 2002 steps per curve at batch 32)
  took 231 s on one thread under load (ACC 98.0 -> 95.6, ASR 100 -> 0.7): one curve step costs about 12.5 ms.

One pipeline builds every victim (:func:`victim`): load the split, build the attack with the dataset's options
(``tsc_fast.testbed.attacks.ATTACK_OPTIONS``), poison the training set, build the dataset's classifier, train it
with a given routine, evaluate. :func:`make_backdoored` trains with the plain recipe (:func:`plain_training`);
:func:`make_backdoored_digits` and :func:`digits_victim` are its digits cases (the demo's victim, and the
pipeline ``tsc_fast.testbed.adaptive_attack`` passes its adaptive routine to). :func:`make_clean` trains the same
recipe on the clean training set: the reference that tells a backdoor from a trigger that fools any model.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..data.embedded import load_digits_split, load_mnist_split
from ..data.splits import DatasetSplits, clean_subset
from ..metrics import evaluate
from ..models import build_classifier
from .attacks import ATTACK_OPTIONS, Attack, build_attack, poison_dataset
from .classifier import train_classifier


@dataclass(frozen=True)
class VictimData:
    """A dataset the testbed trains victims on: its loader (``split_seed`` -> splits), the package model sized for
    it and the recipe's number of epochs (the optimiser, learning rate and batch size are common)."""

    load: Callable[[int], DatasetSplits]
    arch: str
    epochs: int


VICTIM_DATASETS: dict[str, VictimData] = {
    "digits": VictimData(load=lambda seed: load_digits_split(seed=seed), arch="cnn", epochs=40),
    "mnist": VictimData(load=lambda seed: load_mnist_split(seed=seed), arch="mnist_cnn", epochs=20),
}


def victim_data(dataset: str) -> VictimData:
    """The recipe of ``dataset`` (``digits`` or ``mnist``); a clear error for another name."""
    try:
        return VICTIM_DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown victim dataset {dataset!r}; known: {', '.join(VICTIM_DATASETS)}") from None


@functools.lru_cache(maxsize=4)
def _splits(dataset: str, split_seed: int) -> DatasetSplits:
    """The dataset's split, read once per process (MNIST's CSV takes seconds); its tensors are never modified."""
    return victim_data(dataset).load(split_seed)


def dataset_attack_options(dataset: str, attack: str) -> dict[str, Any]:
    """The options under which ``attack`` runs on ``dataset`` (a copy of its entry in ``ATTACK_OPTIONS``)."""
    victim_data(dataset)
    return dict(ATTACK_OPTIONS.get(dataset, {}).get(attack, {}))


@dataclass
class BackdoorSetup:
    """A backdoored model with everything needed to defend and evaluate it.

    ``x_train, y_train``: the clean training set (the defender's clean subset is drawn from it);
    ``x_poisoned, y_poisoned``: the training set the victim actually saw; ``poisoned_index``: its poisoned rows;
    ``before``: ``{"acc", "asr", "ra"}`` of ``model`` in percent; ``config["dataset"]``: ``"digits"`` or ``"mnist"``.
    """

    model: nn.Module
    attack: Attack
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_poisoned: torch.Tensor
    y_poisoned: torch.Tensor
    poisoned_index: torch.Tensor
    before: dict[str, float]
    train_seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def clean_subset(self, fraction: float = 0.05, seed: int = 0, class_balanced: bool = False) -> TensorDataset:
        """The defender's clean data: a random ``fraction`` of the CLEAN training set (5% of the digits' 1437 -> 72,
        of MNIST's 4000 -> 200)."""
        return clean_subset(
            TensorDataset(self.x_train, self.y_train), fraction, seed=seed, class_balanced=class_balanced
        )

    def evaluate(self, model: nn.Module | None = None, batch_size: int = 512) -> dict[str, float]:
        """ACC / ASR / RA (percent) of ``model`` (default: the backdoored one) on this setup's test set."""
        return evaluate(self.model if model is None else model, self.x_test, self.y_test, self.attack, batch_size)


class VictimTrainer(Protocol):
    """A victim's training routine: trains ``model`` in place on the poisoned set ``(x, y)`` (``x_train, y_train``:
    the clean training set, ``attack``: the backdoor) and returns extra entries for the setup's ``config``, or None."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: Attack, x_train: torch.Tensor,
                 y_train: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> dict[str, Any] | None:
        ...


def plain_training(progress: bool = True) -> VictimTrainer:
    """The plain victim recipe: :func:`~tsc_fast.testbed.classifier.train_classifier` on the poisoned set."""

    def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
              seed: int, **_: Any) -> None:
        train_classifier(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)

    return train


def victim(
    dataset: str = "digits",
    attack: str = "badnets",
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
    arch: str | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    split_seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    *,
    train: VictimTrainer,
    name: str | None = None,
) -> BackdoorSetup:
    """The victim pipeline: split, attack, poisoned training set, classifier, ``train``, evaluation.

    ``dataset``: ``"digits"`` or ``"mnist"``; ``arch`` and ``epochs`` default to the dataset's recipe
    (:data:`VICTIM_DATASETS`). ``attack_options`` go to the attack exactly as given (``None``: no options, the
    attack's own defaults; :func:`make_backdoored` passes the dataset's table). ``seed`` drives the model's
    initialisation, the choice of poisoned images and (through ``train``) the batch order; ``split_seed`` the
    train/test split (MNIST's split is fixed). ``name``: the victim's name in ``config["attack"]`` (default:
    ``attack``; when it differs, ``config["base_attack"]`` records ``attack``). ``config`` also holds the settings
    and whatever ``train`` returns; ``train_seconds`` times ``train``.
    """
    recipe = victim_data(dataset)
    arch = recipe.arch if arch is None else arch
    epochs = recipe.epochs if epochs is None else int(epochs)
    splits = _splits(dataset, int(split_seed))
    x_train, y_train = (t.clone() for t in splits.train_tensors())    # the cached split stays untouched
    x_test, y_test = (t.clone() for t in splits.test_tensors())
    trigger = build_attack(attack, splits.image_shape, target=target, **(attack_options or {}))
    x_poisoned, y_poisoned, poisoned_index = poison_dataset(x_train, y_train, trigger, rate=rate, seed=seed)
    model = build_classifier(arch, splits.image_shape, splits.num_classes, seed=seed)
    start = time.perf_counter()
    extra = train(model, x_poisoned, y_poisoned, attack=trigger, x_train=x_train, y_train=y_train, epochs=epochs,
                  batch_size=batch_size, lr=lr, seed=seed)
    train_seconds = time.perf_counter() - start
    config: dict[str, Any] = {"dataset": dataset, "attack": attack if name is None else name}
    if name is not None and name != attack:
        config["base_attack"] = attack
    config.update({
        "rate": rate, "target": target, "seed": seed, "arch": arch, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "split_seed": split_seed, "attack_options": dict(attack_options or {}),
    })
    config.update(extra or {})
    return BackdoorSetup(
        model=model, attack=trigger, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        x_poisoned=x_poisoned, y_poisoned=y_poisoned, poisoned_index=poisoned_index,
        before=evaluate(model, x_test, y_test, trigger), train_seconds=train_seconds, config=config,
    )


def digits_victim(
    attack: str = "badnets",
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
    arch: str = "cnn",
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    split_seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    *,
    train: VictimTrainer,
    name: str | None = None,
) -> BackdoorSetup:
    """The digits victim pipeline: :func:`victim` on ``"digits"`` (the arguments as there)."""
    return victim("digits", attack, rate, target, seed, arch, epochs, batch_size, lr, split_seed, attack_options,
                  train=train, name=name)


def make_backdoored(
    dataset: str = "digits",
    attack: str = "badnets",
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
    arch: str | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    split_seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> BackdoorSetup:
    """Train a backdoored classifier on ``dataset`` (``"digits"`` or ``"mnist"``) with the plain recipe: the
    dataset's model and epochs (unless ``arch``/``epochs`` are given) and the dataset's attack settings
    (``ATTACK_OPTIONS[dataset][attack]``) unless ``attack_options`` is given (then exactly those, ``{}`` meaning
    the attack's own defaults). ``config["attack_options"]`` records what the attack got.
    """
    if attack_options is None:
        attack_options = dataset_attack_options(dataset, str(attack).lower())
    return victim(dataset, attack, rate, target, seed, arch, epochs, batch_size, lr, split_seed, attack_options,
                  train=plain_training(progress))


def make_backdoored_digits(
    attack: str = "badnets",
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
    arch: str = "cnn",
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    split_seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> BackdoorSetup:
    """Train a backdoored classifier on the digits (the demo's and benchmarks' victim): :func:`digits_victim` with
    the plain recipe.

    ``seed`` drives the model's initialisation, the choice of poisoned images and the batch order;
    ``split_seed`` the train/test split; ``attack_options`` go to the attack (e.g. ``alpha`` for blended; ``None``:
    the attack's own defaults, NOT the digits table: ``make_backdoored("digits", ...)`` takes the table).
    """
    return digits_victim(attack, rate, target, seed, arch, epochs, batch_size, lr, split_seed, attack_options,
                         train=plain_training(progress))


def make_clean(dataset: str = "digits", seed: int = 0, arch: str | None = None, epochs: int | None = None,
               batch_size: int = 64, lr: float = 3e-3, split_seed: int = 0, progress: bool = False) -> nn.Module:
    """The dataset's victim recipe trained on the CLEAN training set (no poisoning), same seed rules: the model a
    trigger is measured on to tell a backdoor (low ASR here) from an input that fools any model (high ASR here)."""
    recipe = victim_data(dataset)
    splits = _splits(dataset, int(split_seed))
    x_train, y_train = splits.train_tensors()
    model = build_classifier(recipe.arch if arch is None else arch, splits.image_shape, splits.num_classes, seed=seed)
    return train_classifier(model, x_train, y_train, epochs=recipe.epochs if epochs is None else int(epochs),
                            batch_size=batch_size, lr=lr, seed=seed, progress=progress)
