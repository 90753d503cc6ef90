"""WaNet (Nguyen & Tran, "WaNet -- imperceptible warping-based backdoor attack", ICLR 2021, arXiv 2102.10369).
Dirty label, with the paper's noise mode.

Trigger: a fixed smooth warp applied with ``grid_sample``; noise-mode images (the warp plus a random per-pixel
offset) keep their labels. Parameters: ``grid_size`` (default 4), ``strength`` (default 0.5), ``grid_rescale``
(default 1), ``cross_ratio`` (noise images per backdoor image, default 2), ``field_seed`` (default 0).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...data.splits import round_half_up
from .base import Attack, PoisonedSet, _seeded_generator, choose_cross_indices


class WaNet(Attack):
    """WaNet (Nguyen & Tran, "WaNet -- imperceptible warping-based backdoor attack", ICLR 2021, arXiv 2102.10369).
    Dirty label, with the paper's noise mode.

    Trigger: a fixed smooth warp. A ``grid_size`` x ``grid_size`` field of random 2-D offsets (uniform in [-1, 1],
    divided by its mean absolute value; seeded by ``field_seed``) is upsampled bicubically to H x W; the sampling
    grid is ``clip((identity + strength * field / size) * grid_rescale, -1, 1)`` in grid_sample's [-1, 1]
    coordinates (``size`` = H for rows, W for columns), applied with bilinear ``grid_sample`` (align_corners=True).
    Noise mode: ``cross_ratio`` x (number of backdoor images) further training images get the warp plus a random
    per-pixel offset uniform in [-1/size, 1/size] and KEEP their labels, so the victim learns the exact warp rather
    than "any warp" (``PoisonedSet.cross_index`` lists them). Defaults from the paper: ``grid_size`` 4,
    ``strength`` 0.5, ``grid_rescale`` 1, ``cross_ratio`` 2. On tiny images (8x8 digits) a stronger warp (strength
    about 2) implants much faster. Shortcut: the paper re-draws backdoor and noise images in every batch; here they
    are drawn once (a static poisoned set).
    """

    name = "wanet"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        grid_size: int = 4,
        strength: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        field_seed: int = 0,
    ):
        super().__init__(image_shape, target)
        if int(grid_size) != grid_size or grid_size < 2:
            raise ValueError(f"grid_size must be an integer >= 2, got {grid_size}")
        if strength < 0 or grid_rescale <= 0 or cross_ratio < 0:
            raise ValueError(f"need strength >= 0, grid_rescale > 0 and cross_ratio >= 0, got {strength}, "
                             f"{grid_rescale}, {cross_ratio}")
        self.grid_size, self.strength = int(grid_size), float(strength)
        self.grid_rescale, self.cross_ratio = float(grid_rescale), float(cross_ratio)
        self.grid = self._warp_grid(_seeded_generator(field_seed))

    def _identity_grid(self) -> torch.Tensor:
        _, height, width = self.image_shape
        rows = torch.linspace(-1, 1, height, dtype=torch.float64)
        cols = torch.linspace(-1, 1, width, dtype=torch.float64)
        row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
        return torch.stack((col_grid, row_grid), dim=-1)  # grid_sample wants (x = column, y = row)

    def _sizes(self) -> torch.Tensor:
        _, height, width = self.image_shape
        return torch.tensor([width, height], dtype=torch.float64)

    def _warp_grid(self, generator: torch.Generator) -> torch.Tensor:
        _, height, width = self.image_shape
        offsets = torch.rand(1, 2, self.grid_size, self.grid_size, generator=generator, dtype=torch.float64) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        grid = (self._identity_grid() + self.strength * field / self._sizes()) * self.grid_rescale
        return grid.clamp(-1, 1).float()  # (H, W, 2)

    def _warp(self, batch: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(device=batch.device, dtype=batch.dtype).expand(len(batch), -1, -1, -1)
        warped = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return warped.clamp(0.0, 1.0)  # bilinear weights sum to 1; clamp only removes rounding

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        return self._warp(batch, self.grid[None])

    def noise_warp(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Noise-mode images: the warp plus a random per-pixel offset (seeded), for training with TRUE labels."""
        batch = self._as_batch(x)
        _, height, width = self.image_shape
        jitter = torch.rand(len(batch), height, width, 2, generator=_seeded_generator(seed), dtype=torch.float64)
        grids = (self.grid.double()[None] + (jitter * 2 - 1) / self._sizes()).clamp(-1, 1)
        warped = self._warp(batch, grids)
        return warped if x.dim() == 4 else warped[0]

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, rate: float = 0.1, seed: int = 0, exclude_target: bool = False
    ) -> PoisonedSet:
        """Dirty-label backdoor images (as ``Attack.poison``) plus ``cross_ratio`` times as many noise-mode images
        drawn among the rest, which keep their labels."""
        x_poisoned, y_poisoned, index = Attack.poison(self, x, y, rate, seed, exclude_target)
        cross = choose_cross_indices(len(y), index, round_half_up(self.cross_ratio * len(index)), seed)
        if len(cross):
            on_device = cross.to(x.device)
            x_poisoned[on_device] = self.noise_warp(x[on_device], seed)
        return PoisonedSet(x_poisoned, y_poisoned, index, cross)

    def __repr__(self) -> str:
        return (f"WaNet(image_shape={self.image_shape}, target={self.target}, grid_size={self.grid_size}, "
                f"strength={self.strength}, cross_ratio={self.cross_ratio})")
