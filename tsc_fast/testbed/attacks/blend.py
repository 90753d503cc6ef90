"""Blended (Chen, Liu, Li, Lu & Song, "Targeted backdoor attacks on deep learning systems using data poisoning",
2017, arXiv 1712.05526). Dirty label.

Trigger: ``x' = (1 - alpha) x + alpha p`` with a fixed pattern ``p``. Parameters: ``alpha`` (blend ratio,
default 0.2), ``pattern`` (a (C, H, W) tensor; default U(0, 1) noise drawn from ``pattern_seed``, default 0).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Attack


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
