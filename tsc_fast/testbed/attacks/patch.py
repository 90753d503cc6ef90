"""Patch triggers: BadNets and a user's own pasted pattern (PatchTrigger).

- BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: identifying vulnerabilities in the machine learning model supply
  chain", 2017, arXiv 1708.06733). Dirty label: a small square of fixed value stamped on the image. Parameters:
  ``patch_size`` (default ``max(2, round(3/32 * min(H, W)))``: 2 px at 8x8, 3 px at 32x32, BackdoorBench's CIFAR
  patch), ``position`` (a corner or ``(row, col)``, default bottom right), ``value`` (default 1.0: white),
  ``margin`` (default 0).
- PatchTrigger: no paper; a user's trigger ``(1 - mask) * x + mask * pattern`` given as tensors or PNG files
  (``from_png``), the trigger ``tsc-purify`` evaluates a user's model with. Parameters: ``pattern``, ``mask``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from ...data.splits import round_half_up
from .base import Attack, _check_image_shape

# BadNets patch side relative to the image side: 2 px at 8x8, 3 px at 32x32 (BackdoorBench's CIFAR patch).
BADNETS_PATCH_FRACTION = 3 / 32
BADNETS_MIN_PATCH = 2


def default_patch_size(height: int, width: int) -> int:
    """BadNets' default patch side for an ``height`` x ``width`` image (also LC's corner patches)."""
    return max(BADNETS_MIN_PATCH, round_half_up(BADNETS_PATCH_FRACTION * min(height, width)))


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
            patch_size = default_patch_size(height, width)
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


class PatchTrigger(Attack):
    """A user's own trigger: ``(1 - mask) * x + mask * pattern``, a pattern pasted where the mask is on.

    ``pattern`` is (C, H, W) in [0, 1]; ``mask`` is (1, H, W) or (C, H, W) in [0, 1] (1: the pattern's pixel,
    0: the image's, in between: blended). :meth:`from_png` reads both from image files.
    """

    name = "patch"

    def __init__(self, image_shape: Sequence[int], pattern: torch.Tensor, mask: torch.Tensor, target: int = 0):
        super().__init__(image_shape, target)
        channels = self.image_shape[0]
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if tuple(pattern.shape) != self.image_shape:
            raise ValueError(f"trigger pattern must have shape {self.image_shape}, got {tuple(pattern.shape)}")
        if mask.dim() != 3 or mask.shape[0] not in (1, channels) or tuple(mask.shape[1:]) != self.image_shape[1:]:
            raise ValueError(f"trigger mask must have shape (1 or {channels}, {self.image_shape[1]}, "
                             f"{self.image_shape[2]}), got {tuple(mask.shape)}")
        for what, value in (("pattern", pattern), ("mask", mask)):
            if not bool(torch.isfinite(value).all()) or float(value.min()) < 0 or float(value.max()) > 1:
                raise ValueError(f"trigger {what} values must be in [0, 1]")
        if not bool((mask > 0).any()):
            raise ValueError("the trigger mask is empty (all zero): the trigger would change no pixel")
        self.pattern, self.mask = pattern.clone(), mask.expand(channels, -1, -1).clone()

    @classmethod
    def from_png(cls, pattern_path, mask_path, image_shape: Sequence[int], target: int = 0) -> "PatchTrigger":
        """Read the pattern and the mask from image files, resized to the images' size (the mask with nearest
        neighbours, so a hard edge stays hard); the mask is read as grayscale, white = trigger."""
        channels, height, width = _check_image_shape(image_shape)
        pattern = _read_trigger_image(pattern_path, "L" if channels == 1 else "RGB", (width, height), "bilinear")
        mask = _read_trigger_image(mask_path, "L", (width, height), "nearest")
        return cls(image_shape, pattern, mask, target)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(device=batch.device, dtype=batch.dtype)
        mask = self.mask.to(device=batch.device, dtype=batch.dtype)
        return (1.0 - mask) * batch + mask * pattern


def _read_trigger_image(path, mode: str, size: tuple[int, int], resample: str) -> torch.Tensor:
    """An image file as a float (C, H, W) tensor in [0, 1], converted to ``mode`` and resized to ``size`` (W, H)."""
    # Pillow is an optional dependency (the "vision" extra): imported only when a trigger image is read.
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger image not found: {path}")
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.BILINEAR if resample == "bilinear" else Image.NEAREST)
            array = np.array(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from None
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
