"""Training the victim: a plain classifier trainer and the backdoored digits model the demo and benchmarks use.

The victim recipe (docs/calibration.md): Adam, lr 3e-3, batch 64, 40 epochs, no augmentation. On the digits CNN it
gives ACC above 99% and ASR 100% for BadNets in a few seconds on a 2-core CPU.

One pipeline builds every digits victim (:func:`digits_victim`): load the split, build the attack, poison the
training set, build the classifier, train it with a given routine, evaluate. :func:`make_backdoored_digits` trains
with the plain recipe (:func:`plain_training`); ``tsc_fast.testbed.adaptive_attack`` passes its adaptive routine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..data.embedded import load_digits_split
from ..data.splits import clean_subset
from ..metrics import evaluate
from ..models import build_classifier
from .attacks import Attack, build_attack, poison_dataset
from .classifier import train_classifier


@dataclass
class BackdoorSetup:
    """A backdoored model with everything needed to defend and evaluate it.

    ``x_train, y_train``: the clean training set (the defender's clean subset is drawn from it);
    ``x_poisoned, y_poisoned``: the training set the victim actually saw; ``poisoned_index``: its poisoned rows;
    ``before``: ``{"acc", "asr", "ra"}`` of ``model`` in percent.
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
        """The defender's clean data: a random ``fraction`` of the CLEAN training set (5% of 1437 -> 72)."""
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
    """The digits victim pipeline: split, attack, poisoned training set, classifier, ``train``, evaluation.

    ``seed`` drives the model's initialisation, the choice of poisoned images and (through ``train``) the batch
    order; ``split_seed`` the train/test split; ``attack_options`` go to the attack. ``name``: the victim's name in
    ``config["attack"]`` (default: ``attack``; when it differs, ``config["base_attack"]`` records ``attack``).
    ``config`` also holds the settings and whatever ``train`` returns; ``train_seconds`` times ``train``.
    """
    splits = load_digits_split(seed=split_seed)
    x_train, y_train = splits.train_tensors()
    x_test, y_test = splits.test_tensors()
    trigger = build_attack(attack, splits.image_shape, target=target, **(attack_options or {}))
    x_poisoned, y_poisoned, poisoned_index = poison_dataset(x_train, y_train, trigger, rate=rate, seed=seed)
    model = build_classifier(arch, splits.image_shape, splits.num_classes, seed=seed)
    start = time.perf_counter()
    extra = train(model, x_poisoned, y_poisoned, attack=trigger, x_train=x_train, y_train=y_train, epochs=epochs,
                  batch_size=batch_size, lr=lr, seed=seed)
    train_seconds = time.perf_counter() - start
    config: dict[str, Any] = {"dataset": "digits", "attack": attack if name is None else name}
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
    ``split_seed`` the train/test split; ``attack_options`` go to the attack (e.g. ``alpha`` for blended).
    """
    return digits_victim(attack, rate, target, seed, arch, epochs, batch_size, lr, split_seed, attack_options,
                         train=plain_training(progress))
