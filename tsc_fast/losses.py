"""Curve losses for self-supervised encoders: SimCLR's NT-Xent over two augmented views of a batch, as a
``loss_fn(model, batch)`` for :func:`tsc_fast.purify` that never reads labels.

- ``augment_views``: augmentations that make sense for small images (a shift of up to one pixel, a small
  rescaling, a small erased square, contrast and brightness jitter, a little noise); no flips: a flipped digit is
  another digit.
- ``nt_xent``: the normalised temperature-scaled cross-entropy over two views of a batch.
- ``contrastive_loss_fn``: two augmented views of ``batch[0]``, NT-Xent of the model's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .batches import random_translate

DEFAULT_TEMPERATURE = 0.5   # SimCLR's small-batch setting (CIFAR experiments use 0.5)


@dataclass(frozen=True)
class Augmentation:
    """Strengths of the 8x8 augmentations (all applied per image, batched). No flips."""

    max_shift: int = 1              # pixels, each direction
    scale: float = 0.15             # zoom factor drawn from [1 - scale, 1 + scale]
    erase_prob: float = 0.3         # chance of zeroing one erase_size x erase_size square
    erase_size: int = 2
    contrast: float = 0.3           # factor drawn from [1 - contrast, 1 + contrast] around the image mean
    brightness: float = 0.1         # offset drawn from [-brightness, brightness]
    noise: float = 0.05             # Gaussian noise standard deviation


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_scale(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zoom each image about its centre by a factor in [1 - amount, 1 + amount] (bilinear, zero outside)."""
    if amount <= 0:
        return x
    zoom = _uniform(len(x), 1 - amount, 1 + amount, generator).to(x)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erase(x: torch.Tensor, prob: float, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability ``prob`` per image, zero one randomly placed ``size`` x ``size`` square."""
    n, _, h, w = x.shape
    if prob <= 0 or size <= 0:
        return x
    size = min(size, h, w)
    erase = torch.rand(n, generator=generator) < prob
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None].to(x.device)
    return x.masked_fill(mask, 0.0)


def random_photometric(x: torch.Tensor, contrast: float, brightness: float, noise: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Contrast about each image's mean, a brightness offset and Gaussian noise, clamped to [0, 1]."""
    n = len(x)
    shape = (n, 1, 1, 1)
    factor = _uniform(n, 1 - contrast, 1 + contrast, generator).view(shape).to(x)
    offset = _uniform(n, -brightness, brightness, generator).view(shape).to(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    out = (x - mean) * factor + mean + offset
    if noise > 0:
        out = out + noise * torch.randn(x.shape, generator=generator).to(x)
    return out.clamp(0.0, 1.0)


def augment_view(x: torch.Tensor, augmentation: Augmentation = Augmentation(),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of an (N, C, H, W) batch in [0, 1]; same shape, values in [0, 1]."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) image batch, got shape {tuple(x.shape)}, dtype {x.dtype}")
    a = augmentation
    view = random_scale(x, a.scale, generator)
    view = random_translate(view, a.max_shift, generator)
    view = random_erase(view, a.erase_prob, a.erase_size, generator)
    return random_photometric(view, a.contrast, a.brightness, a.noise, generator)


def augment_views(x: torch.Tensor, augmentation: Augmentation = Augmentation(),
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of the same batch."""
    return augment_view(x, augmentation, generator), augment_view(x, augmentation, generator)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2N embeddings, cross-entropy of picking its other view among the other
    2N - 1 (cosine similarities / temperature); the mean over all 2N."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (N, D) embeddings of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if len(z1) < 2:
        raise ValueError("NT-Xent needs at least 2 examples per batch (the others are the negatives)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def contrastive_loss_fn(temperature: float = DEFAULT_TEMPERATURE, augmentation: Augmentation = Augmentation(),
                        seed: int = 0) -> Callable[[Callable[[torch.Tensor], torch.Tensor], Any], torch.Tensor]:
    """A ``loss_fn(model, batch)`` for purify / train_curve / finetune_model: NT-Xent of two augmented views of
    ``batch[0]`` (or of ``batch`` when it is a tensor). No label is read. Views draw from a generator seeded once."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(model: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        v1, v2 = augment_views(x, augmentation, generator)
        z = model(torch.cat([v1, v2]))   # one pass: BatchNorm sees both views together, as in SimCLR
        return nt_xent(z[: len(x)], z[len(x):], temperature)

    return loss_fn


# ---------------------------------------------------------------------------------------------------------------
# pre-training (optionally backdoored)
