"""Backdoor attacks as batched tensor operations (all-to-one, implemented from the papers).

Dirty-label attacks (the poisoned training images are relabelled to ``target``):

- BadNets (Gu et al., 2017, arXiv 1708.06733): stamp a small patch of fixed value on the image.
- Blended (Chen et al., 2017, arXiv 1712.05526): x' = (1 - alpha) x + alpha p with a fixed pattern p.
- BPP (Wang et al., CVPR 2022): bit-depth reduction with Floyd-Steinberg dithering.
- LowFrequency (Zeng et al., ICCV 2021): a smooth additive trigger made of low spatial frequencies only.
- WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warp, plus randomly warped "noise" images that keep their label.
- InputAware (Nguyen & Tran, NeurIPS 2020): a trained generator makes a different trigger for every input.

Clean-label attacks (only target-class training images are poisoned, and every label stays true):

- SIG (Barni et al., ICIP 2019): a horizontal sinusoid added to the image.
- LabelConsistent (Turner et al., 2019, arXiv 1912.02771): adversarially perturbed target images plus corner patches.

Images are float tensors in [0, 1], shaped (C, H, W) or (N, C, H, W); ``apply`` never changes its input and every
trigger keeps images in [0, 1]. ``Attack.poison(x, y, rate, seed)`` poisons a training set; ``poison_dataset`` is
the same as a function.

Dirty-label poisoning follows BackdoorBench's all-to-one rule: ``round(rate * n)`` training images drawn uniformly
among ALL n training images, target-class images included (they keep their label but carry the trigger); pass
``exclude_target=True`` to draw only among non-target images. Clean-label poisoning draws ``round(rate * n)``
images among the target class (capped, with a warning, at the size of that class). The triggered TEST set, in
contrast, holds only non-target images (see ``metrics``).
"""
from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.splits import round_half_up
from .classifier import train_classifier
from ..metrics import triggered_test_set  # noqa: F401 - the ASR test set, importable with the attacks

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
    from pathlib import Path

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


# --- poisoning helpers ----------------------------------------------------------------------------------------


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


def _sorted_choice(candidates: np.ndarray, count: int, rng: np.random.Generator) -> torch.Tensor:
    chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.empty(0, np.int64)
    return torch.from_numpy(chosen.astype(np.int64))


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


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


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


# --- BPP ------------------------------------------------------------------------------------------------------


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


# --- Low Frequency ----------------------------------------------------------------------------------------------


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


# --- SIG ------------------------------------------------------------------------------------------------------


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


# --- Label-consistent -----------------------------------------------------------------------------------------


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
    surrogate CNN (``DigitsCNN``) is trained on the clean training data for ``surrogate_epochs`` epochs (about a
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
    ):
        super().__init__(image_shape, target)
        _, height, width = self.image_shape
        if patch_size is None:
            patch_size = max(BADNETS_MIN_PATCH, round_half_up(BADNETS_PATCH_FRACTION * min(height, width)))
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
        """A small CNN trained on the clean ``(x, y)`` (Adam, ``surrogate_epochs`` epochs) for the PGD step."""
        from ..models import build_classifier

        model = build_classifier("cnn", self.image_shape, int(y.max()) + 1, seed=seed).to(x.device)
        return train_classifier(model, x, y, epochs=self.surrogate_epochs, seed=seed, progress=False)

    def _poison_images(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        model = getattr(self, "_poison_model", None)
        if model is not None and self.pgd_steps > 0 and self.epsilon > 0:
            x = pgd_away_from_labels(model, x, y, self.epsilon, self.pgd_steps, self.step_size).to(x.device)
        return self.apply(x)

    def __repr__(self) -> str:
        return (f"LabelConsistent(image_shape={self.image_shape}, target={self.target}, epsilon={self.epsilon:.4g}, "
                f"pgd_steps={self.pgd_steps}, patch_size={self.patch_size}, amplitude={self.amplitude})")


# --- WaNet ----------------------------------------------------------------------------------------------------


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


# --- Input-aware ----------------------------------------------------------------------------------------------


def _small_generator(in_channels: int, out_channels: int, hidden: int) -> nn.Module:
    """Three 3x3 convolutions with ReLUs and a sigmoid: an image-to-image map with outputs in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, out_channels, 3, padding=1), nn.Sigmoid(),
    )


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Input-aware's diversity term: mean over pairs of ``||x1 - x2|| / ||g(x1) - g(x2)||`` (small when distinct
    inputs get distinct outputs)."""
    input_distance = (x1 - x2).flatten(1).norm(dim=1)
    output_distance = (out1 - out2).flatten(1).norm(dim=1)
    return (input_distance / (output_distance + 1e-6)).mean()


class InputAware(Attack):
    """Input-aware dynamic backdoor (IAD; Nguyen & Tran, "Input-aware dynamic backdoor attack", NeurIPS 2020,
    arXiv 2010.08138). Dirty label, with the paper's cross-trigger mode.

    Trigger: ``x + m(x) (g(x) - x)``: a pattern generator ``g`` and a mask generator ``m`` (small conv nets, outputs
    in (0, 1)) make a different trigger for every image. Training (``fit``, done on the poisoning data the first
    time ``poison`` runs): (1) ``mask_steps`` Adam steps on ``m`` alone with the diversity loss plus
    ``lambda_norm * relu(mean(m) - mask_density)``; (2) ``train_steps`` joint Adam steps of ``g`` and a small
    classifier (``DigitsCNN`` of width 16) on batches where a ``backdoor_prob`` share is triggered and relabelled
    to the target, a ``cross_prob`` share carries another image's trigger with its true label, the rest are clean;
    loss = cross-entropy + ``lambda_div`` * diversity(g). Poisoning then uses the frozen generators: ``rate`` of the
    images get their own trigger and the target label, ``cross_ratio`` times as many others get a trigger made from
    a different image and keep their label (``PoisonedSet.cross_index``).
    Shortcuts (to train in seconds on a CPU): tiny generators instead of the paper's encoder-decoders, the
    generator trained against its own small classifier and then frozen (the paper trains it jointly with the victim
    itself), and a static poisoned set. Defaults: ``mask_density`` 0.1 (paper 0.032 at 32x32; larger so a mask
    covers a few pixels at 8x8), ``lambda_div`` 1, ``lambda_norm`` 100, ``backdoor_prob`` = ``cross_prob`` 0.1,
    ``cross_ratio`` 1.
    """

    name = "input_aware"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        mask_density: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        backdoor_prob: float = 0.1,
        cross_prob: float = 0.1,
        cross_ratio: float = 1.0,
        mask_steps: int = 200,
        train_steps: int = 400,
        batch_size: int = 128,
        lr: float = 1e-2,
        hidden: int = 16,
        generator_seed: int = 0,
    ):
        super().__init__(image_shape, target)
        if not 0.0 < mask_density <= 1.0:
            raise ValueError(f"mask_density must be in (0, 1], got {mask_density}")
        if backdoor_prob < 0 or cross_prob < 0 or backdoor_prob + cross_prob > 1 or cross_ratio < 0:
            raise ValueError(f"need backdoor_prob, cross_prob >= 0 with sum <= 1 and cross_ratio >= 0, got "
                             f"{backdoor_prob}, {cross_prob}, {cross_ratio}")
        if mask_steps < 0 or train_steps < 0 or batch_size < 2 or lr <= 0:
            raise ValueError(f"need steps >= 0, batch_size >= 2 and lr > 0, got {mask_steps}, {train_steps}, "
                             f"{batch_size}, {lr}")
        self.mask_density, self.lambda_div, self.lambda_norm = float(mask_density), float(lambda_div), float(lambda_norm)
        self.backdoor_prob, self.cross_prob, self.cross_ratio = float(backdoor_prob), float(cross_prob), float(cross_ratio)
        self.mask_steps, self.train_steps, self.batch_size, self.lr = int(mask_steps), int(train_steps), int(batch_size), float(lr)
        self.generator_seed = int(generator_seed)
        channels = self.image_shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            self.pattern_generator = _small_generator(channels, channels, hidden)
            self.mask_generator = _small_generator(channels, 1, hidden)
        self.fitted = False

    # the trigger ------------------------------------------------------------------------------------------------
    def _combine(self, batch: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``batch`` stamped with the trigger that the generators make from ``source``."""
        pattern, mask = self.pattern_generator(source), self.mask_generator(source)
        return batch + mask * (pattern - batch)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        return self.cross_trigger(batch, batch)

    def cross_trigger(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` stamped with the triggers made from ``source`` (same shape): the paper's cross-trigger images."""
        if not self.fitted:
            raise RuntimeError("InputAware: call fit(x, y) (or poison) before applying the trigger")
        batch, source_batch = self._as_batch(x), self._as_batch(source)
        if batch.shape != source_batch.shape:
            raise ValueError(f"x and source must have the same shape, got {tuple(x.shape)} and {tuple(source.shape)}")
        device = batch.device
        self.pattern_generator.to(device)
        self.mask_generator.to(device)
        with torch.no_grad():
            out = self._combine(batch.float(), source_batch.float()).clamp(0.0, 1.0).to(batch.dtype)
        return out if x.dim() == 4 else out[0]

    # training the generators ------------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> "InputAware":
        """Train the mask and pattern generators on ``(x, y)`` (see the class docstring); seeded by
        ``generator_seed``; the global torch RNG is left untouched. Returns ``self``."""
        from ..models import DigitsCNN

        _check_training_pair(x, y)
        self._as_batch(x[:1])
        num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
        if not 0 <= self.target < num_classes:
            raise ValueError(f"target {self.target} is not one of the {num_classes} classes")
        device = x.device
        x, y = x.float(), y.long()
        generator = torch.Generator().manual_seed(self.generator_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            classifier = DigitsCNN(self.image_shape[0], width=16, num_classes=num_classes).to(device)
        self.pattern_generator.to(device).train()
        self.mask_generator.to(device).train()
        self._fit_mask(x, generator)
        self._fit_pattern(x, y, classifier, generator)
        for net in (self.pattern_generator, self.mask_generator):
            net.eval().requires_grad_(False)
        self.fitted = True
        return self

    def _two_batches(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = min(self.batch_size, n)
        return torch.randperm(n, generator=generator)[:size], torch.randperm(n, generator=generator)[:size]

    def _fit_mask(self, x: torch.Tensor, generator: torch.Generator) -> None:
        optimizer = torch.optim.Adam(self.mask_generator.parameters(), lr=self.lr)
        for _ in range(self.mask_steps):
            first, second = self._two_batches(len(x), generator)
            x1, x2 = x[first.to(x.device)], x[second.to(x.device)]
            m1, m2 = self.mask_generator(x1), self.mask_generator(x2)
            density = F.relu(m1.flatten(1).mean(dim=1) - self.mask_density).mean()
            loss = self.lambda_div * diversity_loss(x1, x2, m1, m2) + self.lambda_norm * density
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.mask_generator.requires_grad_(False)

    def _fit_pattern(self, x: torch.Tensor, y: torch.Tensor, classifier: nn.Module, generator: torch.Generator) -> None:
        parameters = list(classifier.parameters()) + list(self.pattern_generator.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        classifier.train()
        for _ in range(self.train_steps):
            first, second = self._two_batches(len(x), generator)
            x1, y1, x2 = x[first.to(x.device)], y[first.to(y.device)], x[second.to(x.device)]
            n_backdoor = round_half_up(self.backdoor_prob * len(x1))
            n_cross = round_half_up(self.cross_prob * len(x1))
            backdoor = self._combine(x1[:n_backdoor], x1[:n_backdoor])
            cross = self._combine(x1[n_backdoor : n_backdoor + n_cross], x2[n_backdoor : n_backdoor + n_cross])
            inputs = torch.cat([backdoor, cross, x1[n_backdoor + n_cross :]])
            labels = torch.cat([torch.full_like(y1[:n_backdoor], self.target), y1[n_backdoor:]])
            p1, p2 = self.pattern_generator(x1), self.pattern_generator(x2)
            loss = F.cross_entropy(classifier(inputs), labels) + self.lambda_div * diversity_loss(x1, x2, p1, p2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # poisoning --------------------------------------------------------------------------------------------------
    def poison(
        self, x: torch.Tensor, y: torch.Tensor, rate: float = 0.1, seed: int = 0, exclude_target: bool = False
    ) -> PoisonedSet:
        """Fit the generators on ``(x, y)`` if not fitted yet, then poison: ``rate`` of the images get their own
        trigger and the target label; ``cross_ratio`` times as many others get another image's trigger and keep
        their label."""
        _check_training_pair(x, y)
        if not self.fitted:
            self.fit(x, y)
        x_poisoned, y_poisoned, index = Attack.poison(self, x, y, rate, seed, exclude_target)
        cross = choose_cross_indices(len(y), index, round_half_up(self.cross_ratio * len(index)), seed)
        if len(cross):
            donors = _other_indices(cross, len(y), seed)
            on_device = cross.to(x.device)
            x_poisoned[on_device] = self.cross_trigger(x[on_device], x[donors.to(x.device)])
        return PoisonedSet(x_poisoned, y_poisoned, index, cross)

    def __repr__(self) -> str:
        return (f"InputAware(image_shape={self.image_shape}, target={self.target}, mask_density={self.mask_density}, "
                f"cross_ratio={self.cross_ratio}, fitted={self.fitted})")


def _other_indices(index: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """For each entry of ``index``, a random index in ``range(n)`` different from it (seeded); needs n >= 2."""
    rng = np.random.default_rng([int(seed), 2])
    offsets = rng.integers(1, n, size=len(index))  # adding 1..n-1 modulo n never returns the same index
    return torch.from_numpy((np.asarray(index) + offsets) % n).long()


# --- registry and functions -------------------------------------------------------------------------------------

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "bpp": BPP,
    "lf": LowFrequency,
    "sig": SIG,
    "lc": LabelConsistent,
    "wanet": WaNet,
    "input_aware": InputAware,
}
ATTACK_ALIASES = {"low_frequency": "lf", "label_consistent": "lc", "inputaware": "input_aware", "iad": "input_aware"}
CLEAN_LABEL_ATTACKS = tuple(name for name, cls in ATTACKS.items() if cls.clean_label)

# Options under which each attack implants on the 8x8 digits (pixels with only 17 grey levels; tiny images). The
# papers' defaults target 32x32 natural images: 3-bit BPP barely changes a digit, a 20/255 sinusoid or a 0.5 warp
# is too faint to learn in a few epochs. Measured at 10% poisoning, seed 0, 40 epochs (see the module report).
DIGITS_ATTACK_OPTIONS: dict[str, dict] = {
    "badnets": {},
    "blended": {},
    "bpp": {"bits": 1},
    "lf": {},
    "sig": {"delta": 0.3, "test_delta": 0.6},
    "lc": {},
    "wanet": {"strength": 2.0, "grid_size": 3, "cross_ratio": 1.0},
    "input_aware": {},
}


def build_attack(name: str, image_shape: Sequence[int], **options) -> Attack:
    """Build an attack by name (``badnets``, ``blended``, ``bpp``, ``lf``, ``sig``, ``lc``, ``wanet``,
    ``input_aware``; also ``low_frequency``, ``label_consistent``, ``iad``); ``options`` go to its constructor."""
    key = str(name).lower().replace("-", "_")
    key = ATTACK_ALIASES.get(key, key)
    try:
        cls = ATTACKS[key]
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
    return _sorted_choice(candidates, count, np.random.default_rng(seed))


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
