"""Backdoor attacks as batched tensor operations (all-to-one, implemented from the papers).

- BadNets (Gu et al., 2017, arXiv 1708.06733): stamp a small patch of fixed value on the image.
- Blended (Chen et al., 2017, arXiv 1712.05526): x' = (1 - alpha) x + alpha p with a fixed pattern p.

Every poisoned image is relabelled to the attack's ``target``. Images are float tensors in [0, 1], shaped
(C, H, W) or (N, C, H, W); ``apply`` never changes its input.

Poisoning follows BackdoorBench's all-to-one rule: ``round(rate * n)`` training images drawn uniformly among ALL n
training images, target-class images included (they keep their label but carry the trigger); pass
``exclude_target=True`` to draw only among non-target images. The triggered TEST set, in contrast, holds only
non-target images (see ``metrics``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence, Union

import numpy as np
import torch

from .data import round_half_up

ImageShape = tuple[int, int, int]

# BadNets patch side relative to the image side: 2 px at 8x8, 3 px at 32x32 (BackdoorBench's CIFAR patch).
BADNETS_PATCH_FRACTION = 3 / 32
BADNETS_MIN_PATCH = 2


def _check_image_shape(image_shape: Sequence[int]) -> ImageShape:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


class Attack(ABC):
    """An all-to-one backdoor: a trigger ``apply(x)`` and the ``target`` label every triggered image gets."""

    name: str = "attack"

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_shape={self.image_shape}, target={self.target})"


class BadNets(Attack):
    """Patch trigger: a ``patch_size`` square of ``value`` stamped at ``position``.

    Defaults: a white patch in the bottom-right corner, side ``max(2, round(3/32 * min(H, W)))`` pixels (2x2 at
    8x8, 3x3 at 32x32). ``position`` is ``"bottom_right"``, ``"bottom_left"``, ``"top_right"``, ``"top_left"``
    or explicit ``(row, col)`` of the patch's top-left pixel; ``margin`` keeps the patch off the border.
    ``value`` is a float or one value per channel.
    """

    name = "badnets"
    CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        patch_size: int | None = None,
        position: Union[str, tuple[int, int]] = "bottom_right",
        value: Union[float, Sequence[float]] = 1.0,
        margin: int = 0,
    ):
        super().__init__(image_shape, target)
        channels, height, width = self.image_shape
        if patch_size is None:
            patch_size = max(BADNETS_MIN_PATCH, round_half_up(BADNETS_PATCH_FRACTION * min(height, width)))
        if patch_size < 1 or patch_size > min(height, width):
            raise ValueError(f"patch_size must be in [1, {min(height, width)}], got {patch_size}")
        self.patch_size = int(patch_size)
        self.row, self.col = self._top_left(position, int(margin))
        values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        if values.numel() not in (1, channels):
            raise ValueError(f"value must be a float or {channels} per-channel values, got {values.numel()}")
        self.value = values.expand(channels).clone()

    def _top_left(self, position: Union[str, tuple[int, int]], margin: int) -> tuple[int, int]:
        _, height, width = self.image_shape
        size = self.patch_size
        if isinstance(position, str):
            if position not in self.CORNERS:
                raise ValueError(f"position must be one of {self.CORNERS} or (row, col), got {position!r}")
            row = margin if position.startswith("top") else height - size - margin
            col = margin if position.endswith("left") else width - size - margin
        else:
            row, col = (int(p) for p in position)
        if not (0 <= row <= height - size and 0 <= col <= width - size):
            raise ValueError(
                f"a {size}x{size} patch at (row={row}, col={col}) does not fit in a {height}x{width} image"
            )
        return row, col

    def mask(self) -> torch.Tensor:
        """Boolean (H, W) mask of the patch pixels."""
        _, height, width = self.image_shape
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[self.row : self.row + self.patch_size, self.col : self.col + self.patch_size] = True
        return mask

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        out = batch.clone()
        rows = slice(self.row, self.row + self.patch_size)
        cols = slice(self.col, self.col + self.patch_size)
        out[:, :, rows, cols] = self.value.to(device=batch.device, dtype=batch.dtype)[None, :, None, None]
        return out

    def __repr__(self) -> str:
        return (
            f"BadNets(image_shape={self.image_shape}, target={self.target}, patch_size={self.patch_size}, "
            f"top_left=({self.row}, {self.col}), value={self.value.tolist()})"
        )


class Blended(Attack):
    """Blend trigger: ``(1 - alpha) x + alpha p`` with a fixed pattern ``p`` (default U(0,1) noise from a seed)."""

    name = "blended"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        alpha: float = 0.2,
        pattern: torch.Tensor | None = None,
        pattern_seed: int = 0,
    ):
        super().__init__(image_shape, target)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        if pattern is None:
            generator = torch.Generator().manual_seed(int(pattern_seed))
            pattern = torch.rand(self.image_shape, generator=generator)
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        if tuple(pattern.shape) != self.image_shape:
            raise ValueError(f"pattern must have shape {self.image_shape}, got {tuple(pattern.shape)}")
        self.pattern = pattern.clone()

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(device=batch.device, dtype=batch.dtype)
        return (1.0 - self.alpha) * batch + self.alpha * pattern

    def __repr__(self) -> str:
        return f"Blended(image_shape={self.image_shape}, target={self.target}, alpha={self.alpha})"


ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "blended": Blended}


def build_attack(name: str, image_shape: Sequence[int], **options) -> Attack:
    """Build an attack by name (``badnets``, ``blended``); ``options`` go to its constructor (target, ...)."""
    try:
        cls = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}") from None
    return cls(image_shape, **options)


def poison_count(n: int, rate: float) -> int:
    """Number of poisoned training images: ``rate * n`` rounded to nearest (halves up)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poisoning rate must be in [0, 1], got {rate}")
    return round_half_up(rate * n)


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
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    return torch.from_numpy(chosen.astype(np.int64))


def poison_dataset(
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    rate: float = 0.1,
    seed: int = 0,
    exclude_target: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Poison a training set: returns ``(x_poisoned, y_poisoned, poisoned_index)``; inputs are not modified.

    The chosen images (``choose_poison_indices``) get the trigger and the label ``attack.target``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    index = choose_poison_indices(y, attack.target, rate, seed=seed, exclude_target=exclude_target)
    x_poisoned = x.clone()
    y_poisoned = y.clone()
    index_on_device = index.to(x.device)
    x_poisoned[index_on_device] = attack.apply(x[index_on_device])
    y_poisoned[index.to(y.device)] = attack.target
    return x_poisoned, y_poisoned, index


def triggered_test_set(
    x: torch.Tensor, y: torch.Tensor, attack: Attack
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of the test images whose true label is not the target, with their TRUE labels."""
    keep = y != attack.target
    return attack.apply(x[keep]), y[keep]
