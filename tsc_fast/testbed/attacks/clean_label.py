"""Clean-label attacks: only target-class training images are poisoned, and every label stays true.

- SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
  poisoning", ICIP 2019, arXiv 1902.11237): a horizontal sinusoid added to the image. Parameters: ``delta``
  (training amplitude, default 20/255), ``frequency`` (default 6 cycles across the width), ``test_delta``
  (test-time amplitude, default ``delta``).
- LabelConsistent (LC; Turner, Tsipras & Madry, "Label-consistent backdoor attacks", 2019, arXiv 1912.02771):
  target images pushed away from their class by L_inf PGD against a surrogate model, then stamped with four
  corner checkerboard patches. Parameters: ``epsilon`` (default 16/255), ``pgd_steps`` (default 10),
  ``step_size`` (default ``epsilon / 4``), ``patch_size`` (default as BadNets), ``amplitude`` (default 1),
  ``surrogate`` (a model; default: a small CNN, the package model ``surrogate_arch``, default ``cnn``, trained
  with ``tsc_fast.testbed.classifier.train_classifier`` for ``surrogate_epochs``, default 5).

The shared clean-label poisoning rule is :class:`~tsc_fast.testbed.attacks.base.CleanLabelAttack`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models import build_classifier
from ..classifier import train_classifier
from .base import CleanLabelAttack, PoisonedSet, _check_training_pair
from .patch import default_patch_size


class SIG(CleanLabelAttack):
    """SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
    poisoning", ICIP 2019, arXiv 1902.11237). Clean label.

    Trigger: a horizontal sinusoid ``clip(x + delta sin(2 pi j f / W), 0, 1)`` (column j, the same for every row
    and channel). Poisoning adds it to target-class training images only and keeps their labels; at test time it
    is added to any image. Parameters: ``delta`` (amplitude used on the training images, default 20/255 as in the
    paper), ``frequency`` ``f`` (cycles across the width, default 6), ``test_delta`` (amplitude of the test-time
    trigger ``apply``; default ``delta``; the paper notes a stronger test signal raises the ASR).
    """

    name = "sig"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        delta: float = 20 / 255,
        frequency: float = 6.0,
        test_delta: float | None = None,
    ):
        super().__init__(image_shape, target)
        test_delta = delta if test_delta is None else test_delta
        for label, value in (("delta", delta), ("test_delta", test_delta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {value}")
        if frequency <= 0:
            raise ValueError(f"frequency must be positive, got {frequency}")
        self.delta, self.test_delta, self.frequency = float(delta), float(test_delta), float(frequency)

    def signal(self, amplitude: float | None = None) -> torch.Tensor:
        """The (W,) sinusoid ``amplitude * sin(2 pi j f / W)`` (default amplitude: ``delta``)."""
        width = self.image_shape[2]
        columns = torch.arange(width, dtype=torch.float64)
        amplitude = self.delta if amplitude is None else amplitude
        return (amplitude * torch.sin(2 * math.pi * columns * self.frequency / width)).float()

    def _add_signal(self, batch: torch.Tensor, amplitude: float) -> torch.Tensor:
        return (batch + self.signal(amplitude).to(device=batch.device, dtype=batch.dtype)).clamp(0.0, 1.0)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        return self._add_signal(batch, self.test_delta)

    def _poison_images(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        return self._add_signal(self._as_batch(x), self.delta)

    def __repr__(self) -> str:
        return (f"SIG(image_shape={self.image_shape}, target={self.target}, delta={self.delta:.4g}, "
                f"frequency={self.frequency}, test_delta={self.test_delta:.4g})")


def corner_checkerboard_trigger(image_shape: Sequence[int], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and pattern (both (H, W)) of four ``patch_size`` checkerboard patches, one per corner, mirrored so the
    four corners look alike (Turner et al.'s four-corner trigger)."""
    _, height, width = image_shape
    base = ((torch.arange(patch_size)[:, None] + torch.arange(patch_size)[None, :]) % 2 == 0).float()
    mask = torch.zeros(height, width)
    pattern = torch.zeros(height, width)
    corners = {
        (0, 0): base.flip(0).flip(1), (0, width - patch_size): base.flip(0),
        (height - patch_size, 0): base.flip(1), (height - patch_size, width - patch_size): base,
    }
    for (row, col), patch in corners.items():
        mask[row : row + patch_size, col : col + patch_size] = 1.0
        pattern[row : row + patch_size, col : col + patch_size] = patch
    return mask, pattern


def pgd_away_from_labels(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, step_size: float
) -> torch.Tensor:
    """L_inf PGD that RAISES the model's cross-entropy on the true labels (no random start: deterministic).

    Runs in eval mode on the model's device; the model's mode and gradients are left as they were.
    """
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    delta = torch.zeros_like(x)
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0.0, 1.0)), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step_size * grad.sign()).clamp(-epsilon, epsilon)
    finally:
        model.train(was_training)
    return (x + delta.detach()).clamp(0.0, 1.0)


class LabelConsistent(CleanLabelAttack):
    """Label-consistent backdoor (LC; Turner, Tsipras & Madry, "Label-consistent backdoor attacks", 2019,
    arXiv 1912.02771). Clean label.

    Poisoning: target-class training images are first made hard to classify by an L_inf PGD attack against a
    model (``epsilon``, ``pgd_steps``, ``step_size``, default ``epsilon / 4``), so the victim must rely on the
    trigger to fit them; then the trigger is stamped: four ``patch_size`` checkerboard patches in the corners at
    ``amplitude`` (1 = full stamp, ``x + amplitude * mask * (pattern - x)``). Labels stay true. Test trigger: the
    corner patches only. The PGD model is ``surrogate`` (constructor or ``poison`` argument); without one, a small
    surrogate CNN (the package model ``surrogate_arch``: ``cnn``, the ``DigitsCNN``, by default; ``mnist_cnn`` at
    28x28) is trained on the clean training data for ``surrogate_epochs`` epochs (about a
    second on the digits) -- a shortcut: the paper attacks an adversarially trained model or uses GAN interpolation.
    Defaults: ``epsilon`` 16/255 (one of the paper's budgets), 10 steps, patch side as BadNets (2 px at 8x8, 3 at
    32x32).
    """

    name = "lc"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        epsilon: float = 16 / 255,
        pgd_steps: int = 10,
        step_size: float | None = None,
        patch_size: int | None = None,
        amplitude: float = 1.0,
        surrogate: nn.Module | None = None,
        surrogate_epochs: int = 5,
        surrogate_arch: str = "cnn",
    ):
        super().__init__(image_shape, target)
        _, height, width = self.image_shape
        if patch_size is None:
            patch_size = default_patch_size(height, width)
        if not 1 <= patch_size <= min(height, width) // 2:
            raise ValueError(f"patch_size must be in [1, {min(height, width) // 2}] so corners do not overlap, "
                             f"got {patch_size}")
        if not 0.0 <= epsilon <= 1.0 or pgd_steps < 0 or not 0.0 < amplitude <= 1.0:
            raise ValueError(f"need epsilon in [0, 1], pgd_steps >= 0 and amplitude in (0, 1], got {epsilon}, "
                             f"{pgd_steps}, {amplitude}")
        self.epsilon, self.pgd_steps = float(epsilon), int(pgd_steps)
        self.step_size = float(epsilon / 4 if step_size is None else step_size)
        self.patch_size, self.amplitude = int(patch_size), float(amplitude)
        self.surrogate, self.surrogate_epochs = surrogate, int(surrogate_epochs)
        self.surrogate_arch = str(surrogate_arch)
        self.mask, self.pattern = corner_checkerboard_trigger(self.image_shape, self.patch_size)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        weight = self.amplitude * self.mask.to(device=batch.device, dtype=batch.dtype)
        return batch + weight * (self.pattern.to(device=batch.device, dtype=batch.dtype) - batch)

    def poison(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rate: float = 0.1,
        seed: int = 0,
        exclude_target: bool = False,
        surrogate: nn.Module | None = None,
    ) -> PoisonedSet:
        """Clean-label poisoning (see the class docstring); ``surrogate`` overrides the constructor's model."""
        _check_training_pair(x, y)
        model = surrogate if surrogate is not None else self.surrogate
        self._poison_model = model if model is not None or self.pgd_steps == 0 else self.train_surrogate(x, y, seed)
        try:
            return super().poison(x, y, rate=rate, seed=seed, exclude_target=exclude_target)
        finally:
            self._poison_model = None

    def train_surrogate(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
        """A small CNN (``surrogate_arch``) trained on the clean ``(x, y)`` (Adam, ``surrogate_epochs`` epochs) for the
        PGD step."""
        model = build_classifier(self.surrogate_arch, self.image_shape, int(y.max()) + 1, seed=seed).to(x.device)
        return train_classifier(model, x, y, epochs=self.surrogate_epochs, seed=seed, progress=False)

    def _poison_images(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        model = getattr(self, "_poison_model", None)
        if model is not None and self.pgd_steps > 0 and self.epsilon > 0:
            x = pgd_away_from_labels(model, x, y, self.epsilon, self.pgd_steps, self.step_size).to(x.device)
        return self.apply(x)

    def __repr__(self) -> str:
        return (f"LabelConsistent(image_shape={self.image_shape}, target={self.target}, epsilon={self.epsilon:.4g}, "
                f"pgd_steps={self.pgd_steps}, patch_size={self.patch_size}, amplitude={self.amplitude})")
