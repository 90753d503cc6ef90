"""Low Frequency (LF; Zeng, Park, Mao & Jia, "Rethinking the backdoor attacks' triggers: a frequency
perspective", ICCV 2021, arXiv 2104.03413). Dirty label.

Trigger: ``clip(x + p, 0, 1)`` with a fixed smooth pattern ``p`` made of low spatial frequencies only
(``low_frequency_pattern``). Parameters: ``epsilon`` (L_inf size of ``p``, default 0.1), ``max_frequency``
(default ``max(1, round(min(H, W) / 8))``), ``pattern_seed`` (default 0) or an explicit ``pattern``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...data.splits import round_half_up
from .base import Attack, _seeded_generator


def low_frequency_pattern(
    image_shape: Sequence[int], max_frequency: int, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """A smooth (C, H, W) pattern: Gaussian noise keeping only the 2-D Fourier frequencies with
    ``|k_row|, |k_col| <= max_frequency`` cycles per image (the constant term removed), scaled to L_inf ``epsilon``."""
    channels, height, width = image_shape
    noise = torch.randn(channels, height, width, generator=generator, dtype=torch.float64)
    rows = (torch.fft.fftfreq(height, dtype=torch.float64) * height).abs() <= max_frequency
    cols = (torch.fft.fftfreq(width, dtype=torch.float64) * width).abs() <= max_frequency
    keep = rows[:, None] & cols[None, :]
    keep[0, 0] = False  # no constant offset: a pattern, not a brightness change
    pattern = torch.fft.ifft2(torch.fft.fft2(noise) * keep).real
    peak = pattern.abs().max()
    if peak == 0:
        raise ValueError(f"no low-frequency pattern fits a {height}x{width} image with max_frequency={max_frequency}")
    return (pattern * (epsilon / peak)).float()


class LowFrequency(Attack):
    """Low Frequency (LF; Zeng et al., "Rethinking the backdoor attacks' triggers: a frequency perspective",
    ICCV 2021, arXiv 2104.03413). Dirty label.

    Trigger: ``clip(x + p, 0, 1)`` with a fixed smooth pattern ``p`` made only of low spatial frequencies, so that
    it survives low-pass filtering and leaves no high-frequency artefact. The paper searches ``p`` as a universal
    adversarial perturbation passed through a low-pass filter; here ``p`` is low-pass filtered seeded Gaussian
    noise (``low_frequency_pattern``), which keeps the trigger's defining property without needing a model.
    Parameters: ``epsilon`` (L_inf size of ``p``, default 0.1), ``max_frequency`` (highest kept frequency in cycles
    per image along each axis, default ``max(1, round(min(H, W) / 8))``: 4 at 32x32, 1 at 8x8), ``pattern_seed``,
    or an explicit ``pattern``.
    """

    name = "lf"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        epsilon: float = 0.1,
        max_frequency: int | None = None,
        pattern: torch.Tensor | None = None,
        pattern_seed: int = 0,
    ):
        super().__init__(image_shape, target)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        _, height, width = self.image_shape
        if max_frequency is None:
            max_frequency = max(1, round_half_up(min(height, width) / 8))
        if int(max_frequency) != max_frequency or max_frequency < 1:
            raise ValueError(f"max_frequency must be a positive integer, got {max_frequency}")
        self.epsilon = float(epsilon)
        self.max_frequency = int(max_frequency)
        if pattern is None:
            pattern = low_frequency_pattern(self.image_shape, self.max_frequency, self.epsilon,
                                            _seeded_generator(pattern_seed))
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        if tuple(pattern.shape) != self.image_shape:
            raise ValueError(f"pattern must have shape {self.image_shape}, got {tuple(pattern.shape)}")
        self.pattern = pattern.clone()

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch + self.pattern.to(device=batch.device, dtype=batch.dtype)).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (f"LowFrequency(image_shape={self.image_shape}, target={self.target}, epsilon={self.epsilon}, "
                f"max_frequency={self.max_frequency})")
