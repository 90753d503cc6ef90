"""BPP (Wang, Zhai & Ma, "BppAttack: stealthy and efficient trojan attacks against deep neural networks via image
quantization and contrastive adversarial learning", CVPR 2022, arXiv 2205.13383). Dirty label.

Trigger: every channel reduced to ``bits`` bits (``2**bits`` levels) with Floyd-Steinberg dithering. Parameters:
``bits`` (default 3: 8 levels, BackdoorBench's ``squeeze_num`` 8), ``dither`` (default True). Also here: the
quantiser ``quantize`` and the vectorised ``floyd_steinberg`` error diffusion.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Attack


def quantize(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest of ``levels`` evenly spaced values in [0, 1] (inputs outside [0, 1] go to the end levels)."""
    return torch.round(values * (levels - 1)).clamp_(0, levels - 1) / (levels - 1)


def floyd_steinberg(batch: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise (N, C, H, W) images to ``levels`` values per channel with Floyd-Steinberg error diffusion.

    Raster order; each pixel's error goes 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right (errors that fall
    off the border are dropped). Vectorised over images and channels; accumulates in float64.
    """
    n, c, h, w = batch.shape
    work = torch.zeros(n, c, h + 1, w + 2, dtype=torch.float64, device=batch.device)
    work[:, :, :h, 1 : w + 1] = batch
    out = torch.empty(n, c, h, w, dtype=torch.float64, device=batch.device)
    errors = torch.empty(n, c, w, dtype=torch.float64, device=batch.device)
    for i in range(h):
        row = work[:, :, i]
        for j in range(w):
            old = row[:, :, j + 1]
            new = quantize(old, levels)
            out[:, :, i, j] = new
            errors[:, :, j] = old - new
            row[:, :, j + 2] += errors[:, :, j] * (7 / 16)
        below = work[:, :, i + 1]
        below[:, :, 0:w] += errors * (3 / 16)
        below[:, :, 1 : w + 1] += errors * (5 / 16)
        below[:, :, 2 : w + 2] += errors * (1 / 16)
    return out.to(batch.dtype)


class BPP(Attack):
    """BPP (Wang et al., "BppAttack: stealthy and efficient trojan attacks against deep neural networks via image
    quantization and contrastive adversarial learning", CVPR 2022, arXiv 2205.13383). Dirty label.

    Trigger: every channel is reduced to ``bits`` bits, i.e. ``L = 2**bits`` levels ``round(v (L-1)) / (L-1)``,
    with Floyd-Steinberg dithering (``dither=True``) spreading the quantisation error so the image looks unchanged.
    Parameters: ``bits`` (default 3: 8 levels, BackdoorBench's ``squeeze_num`` 8), ``dither`` (default True).
    Left out: the paper's contrastive adversarial learning (negative samples -- adversarially perturbed quantised
    images trained with their TRUE labels -- mixed into each training batch); the victim here trains on a plain
    statically poisoned set, which implants the backdoor but makes it less stealthy against input-level defenses.
    """

    name = "bpp"

    def __init__(self, image_shape: Sequence[int], target: int = 0, bits: int = 3, dither: bool = True):
        super().__init__(image_shape, target)
        if int(bits) != bits or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [1, 8], got {bits}")
        self.bits = int(bits)
        self.levels = 2**self.bits
        self.dither = bool(dither)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        if self.dither:
            return floyd_steinberg(batch, self.levels)
        return quantize(batch, self.levels)

    def __repr__(self) -> str:
        return f"BPP(image_shape={self.image_shape}, target={self.target}, bits={self.bits}, dither={self.dither})"
