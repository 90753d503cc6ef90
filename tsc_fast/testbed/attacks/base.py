"""The attack base classes and the poisoning helpers shared by every attack.

- :class:`Attack`: an all-to-one backdoor, a trigger ``apply(x)`` plus the ``target`` label; its ``poison`` is the
  dirty-label rule below.
- :class:`CleanLabelAttack`: the base of clean-label attacks (SIG, LC): ``poison`` changes only target-class
  images and never a label.
- :class:`PoisonedSet`: what ``poison`` returns, unpacking as ``(x, y, index)`` with a ``cross_index``.
- Index choosers: ``choose_poison_indices`` (dirty label), ``choose_target_indices`` (clean label),
  ``choose_cross_indices`` (WaNet's noise and Input-aware's cross images), ``poison_count``; and
  ``poison_dataset``, ``Attack.poison`` as a function.

Dirty-label poisoning follows BackdoorBench's all-to-one rule: ``round(rate * n)`` training images drawn uniformly
among ALL n training images, target-class images included (they keep their label but carry the trigger); pass
``exclude_target=True`` to draw only among non-target images. Clean-label poisoning draws ``round(rate * n)``
images among the target class (capped, with a warning, at the size of that class). The triggered TEST set, in
contrast, holds only non-target images (see ``metrics``).
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from ...data.splits import round_half_up

ImageShape = tuple[int, int, int]


def _check_image_shape(image_shape: Sequence[int]) -> ImageShape:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


class Attack(ABC):
    """An all-to-one backdoor: a trigger ``apply(x)`` and the ``target`` label every triggered image gets."""

    name: str = "attack"
    clean_label: bool = False  # True: only target-class images are poisoned and labels stay true

    def __init__(self, image_shape: Sequence[int], target: int = 0):
        self.image_shape = _check_image_shape(image_shape)
        if int(target) != target or target < 0:
            raise ValueError(f"target must be a non-negative class index, got {target}")
        self.target = int(target)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of ``x`` ((C, H, W) or (N, C, H, W)); ``x`` itself is left unchanged."""
        batch = self._as_batch(x)
        triggered = self._trigger(batch)
        return triggered if x.dim() == 4 else triggered[0]

    __call__ = apply

    def _as_batch(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected float images in [0, 1], got dtype {x.dtype}")
        batch = x.unsqueeze(0) if x.dim() == 3 else x
        if batch.dim() != 4 or tuple(batch.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name}: images must be (C, H, W) or (N, C, H, W) with (C, H, W) = {self.image_shape}, "
                f"got shape {tuple(x.shape)}"
            )
        return batch

    @abstractmethod
    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        """Return a NEW tensor: the triggered (N, C, H, W) batch."""

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, rate: float = 0.1, seed: int = 0, exclude_target: bool = False
    ) -> "PoisonedSet":
        """Poison a training set (dirty label): ``round(rate * n)`` images get the trigger and the label ``target``.

        Returns a :class:`PoisonedSet` that unpacks as ``(x_poisoned, y_poisoned, poisoned_index)``; the inputs are
        not modified. Clean-label and noise-mode attacks override this.
        """
        _check_training_pair(x, y)
        index = choose_poison_indices(y, self.target, rate, seed=seed, exclude_target=exclude_target)
        x_poisoned, y_poisoned = x.clone(), y.clone()
        if len(index):
            x_poisoned[index.to(x.device)] = self.apply(x[index.to(x.device)])
            y_poisoned[index.to(y.device)] = self.target
        return PoisonedSet(x_poisoned, y_poisoned, index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_shape={self.image_shape}, target={self.target})"


class PoisonedSet(tuple):
    """A poisoned training set; unpacks as ``(x, y, index)`` like ``poison_dataset`` always returned.

    ``index``: sorted int64 indices of the images that carry the backdoor trigger. ``cross_index``: images that
    carry a noise/cross trigger but keep their true label (WaNet's noise mode, Input-aware's cross mode; empty for
    other attacks).
    """

    def __new__(cls, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, cross_index: torch.Tensor | None = None):
        poisoned = super().__new__(cls, (x, y, index))
        poisoned.cross_index = cross_index if cross_index is not None else torch.empty(0, dtype=torch.int64)
        return poisoned

    @property
    def x(self) -> torch.Tensor:
        return self[0]

    @property
    def y(self) -> torch.Tensor:
        return self[1]

    @property
    def index(self) -> torch.Tensor:
        return self[2]


def _check_training_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"expected x and y as torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --- choosing the poisoned images -------------------------------------------------------------------------------


def poison_count(n: int, rate: float) -> int:
    """Number of poisoned training images: ``rate * n`` rounded to nearest (halves up)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poisoning rate must be in [0, 1], got {rate}")
    return round_half_up(rate * n)


def _sorted_choice(candidates: np.ndarray, count: int, rng: np.random.Generator) -> torch.Tensor:
    chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.empty(0, np.int64)
    return torch.from_numpy(chosen.astype(np.int64))


def choose_poison_indices(
    y: torch.Tensor, target: int, rate: float, seed: int = 0, exclude_target: bool = False
) -> torch.Tensor:
    """Sorted int64 indices of the images to poison: ``round(rate * len(y))`` of them, drawn without replacement.

    Candidates are all images (BackdoorBench's all-to-one default) or, with ``exclude_target``, the non-target ones.
    """
    labels = np.asarray(y.cpu()).reshape(-1)
    count = poison_count(len(labels), rate)
    candidates = np.flatnonzero(labels != target) if exclude_target else np.arange(len(labels))
    if count > len(candidates):
        raise ValueError(
            f"cannot poison {count} images: only {len(candidates)} candidates "
            f"({'non-target' if exclude_target else 'all'} images)"
        )
    return _sorted_choice(candidates, count, np.random.default_rng(seed))


def choose_target_indices(y: torch.Tensor, target: int, rate: float, seed: int = 0) -> torch.Tensor:
    """Clean-label choice: sorted indices of ``round(rate * len(y))`` TARGET-class images, drawn without replacement.

    When the target class holds fewer images than that, all of them are taken and a warning says so (at 10% of the
    digits, about 144 poisoned images are asked of a class of about 143).
    """
    labels = np.asarray(y.cpu()).reshape(-1)
    count = poison_count(len(labels), rate)
    candidates = np.flatnonzero(labels == target)
    if count > len(candidates):
        warnings.warn(
            f"clean-label poisoning: rate {rate} asks for {count} images but the target class {target} has only "
            f"{len(candidates)}; poisoning all of them",
            stacklevel=3,
        )
        count = len(candidates)
    return _sorted_choice(candidates, count, np.random.default_rng(seed))


def choose_cross_indices(n: int, taken: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``count`` images (capped at what is left) among ``range(n)`` minus ``taken``."""
    free = np.setdiff1d(np.arange(n), np.asarray(taken.cpu()), assume_unique=True)
    rng = np.random.default_rng([int(seed), 1])  # a stream independent of the backdoor choice
    return _sorted_choice(free, min(int(count), len(free)), rng)


# --- clean-label base and the poisoning function ----------------------------------------------------------------


class CleanLabelAttack(Attack):
    """Base of clean-label attacks: ``poison`` changes only target-class images and never a label."""

    clean_label = True

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, rate: float = 0.1, seed: int = 0, exclude_target: bool = False
    ) -> PoisonedSet:
        """Poison ``round(rate * n)`` target-class images (see ``choose_target_indices``); labels are unchanged.

        ``exclude_target`` is meaningless here (only target images are eligible) and must stay False.
        """
        _check_training_pair(x, y)
        if exclude_target:
            raise ValueError(f"{self.name} is a clean-label attack: it poisons only target-class images")
        index = choose_target_indices(y, self.target, rate, seed=seed)
        x_poisoned = x.clone()
        if len(index):
            on_device = index.to(x.device)
            x_poisoned[on_device] = self._poison_images(x[on_device], y[index.to(y.device)], seed)
        return PoisonedSet(x_poisoned, y.clone(), index)

    def _poison_images(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """The poisoned version of the chosen target-class training images (default: the test trigger)."""
        return self.apply(x)


def poison_dataset(
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    rate: float = 0.1,
    seed: int = 0,
    exclude_target: bool = False,
    **options,
) -> PoisonedSet:
    """Poison a training set: returns ``(x_poisoned, y_poisoned, poisoned_index)``; inputs are not modified.

    Delegates to ``attack.poison``: dirty-label attacks give the chosen images (``choose_poison_indices``) the
    trigger and the label ``attack.target``; clean-label ones (SIG, LC) poison target-class images only and keep
    every label. ``options`` go to ``attack.poison`` (e.g. ``surrogate=`` for LC).
    """
    return attack.poison(x, y, rate=rate, seed=seed, exclude_target=exclude_target, **options)
