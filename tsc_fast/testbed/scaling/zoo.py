"""The scaling study's models and data: sweep points of the three families, seeded random models, random data.

- ``mlp``: :class:`~tsc_fast.models.MLP`, ``mlp_in`` inputs, two hidden layers of ``h`` units (two h-unit
  groups, one h x h layer);
- ``cnn``: :class:`~tsc_fast.models.DigitsCNN` on 1 x ``cnn_image`` x ``cnn_image`` images, width
  w = ``cnn_base_width`` * multiplier (groups of w and 2w channels);
- ``vit``: torchvision's ``VisionTransformer`` (hidden ``vit_hidden``), MLP dim = ``vit_hidden`` * ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ...models import MLP, DigitsCNN
from .config import FAMILIES, ScalingConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SweepPoint:
    family: str
    width: int                 # the sweep variable: hidden units, width multiplier or MLP ratio
    largest_group: int         # units of the largest permutation group it gives


def largest_group(family: str, width: int, config: ScalingConfig) -> int:
    """Units of the largest permutation group of ``family`` at ``width`` (what the caps and --max-width compare)."""
    if family == "mlp":
        return width
    if family == "cnn":
        return 2 * config.cnn_base_width * width                 # conv3's 2w channels
    if family == "vit":
        return max(config.vit_hidden, config.vit_hidden * width)  # the residual stream or the MLP's hidden units
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def family_widths(family: str, config: ScalingConfig) -> tuple[int, ...]:
    """The sweep variable's values of one family."""
    widths = {"mlp": config.mlp_widths, "cnn": config.cnn_multipliers, "vit": config.vit_ratios}
    if family not in widths:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return widths[family]


def sweep_points(config: ScalingConfig) -> list[SweepPoint]:
    """Every (family, width) of the sweep, in order, without those whose largest group exceeds max_width."""
    points = [SweepPoint(family, width, largest_group(family, width, config))
              for family in config.families for width in family_widths(family, config)]
    if config.max_width is not None:
        points = [p for p in points if p.largest_group <= config.max_width]
    return points


def build_mlp(width: int, config: ScalingConfig) -> tuple[nn.Module, tuple[int, ...]]:
    return MLP(in_features=config.mlp_in, hidden=width, depth=2), (config.mlp_in,)


def build_cnn(width: int, config: ScalingConfig) -> tuple[nn.Module, tuple[int, ...]]:
    return DigitsCNN(width=config.cnn_base_width * width), (1, config.cnn_image, config.cnn_image)


def build_vit(width: int, config: ScalingConfig) -> tuple[nn.Module, tuple[int, ...]]:
    # Lazy: torchvision is an optional extra ("vision") and a heavy import; only the ViT family needs it.
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=config.vit_image, patch_size=config.vit_patch, num_layers=config.vit_layers,
                              num_heads=config.vit_heads, hidden_dim=config.vit_hidden,
                              mlp_dim=config.vit_hidden * width, num_classes=10)
    return model, (3, config.vit_image, config.vit_image)


BUILDERS: dict[str, Callable[[int, ScalingConfig], tuple[nn.Module, tuple[int, ...]]]] = {
    "mlp": build_mlp, "cnn": build_cnn, "vit": build_vit}


def build_model(family: str, width: int, config: ScalingConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """(model in eval mode, input shape of one example) for a sweep point; seeded, random weights."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(config.seed)
    model, input_shape = BUILDERS[family](width, config)
    return model.eval(), input_shape


def synthetic_data(input_shape: Sequence[int], samples: int, seed: int = 0, classes: int = 10) -> TensorDataset:
    """A TensorDataset of ``samples`` standard-normal inputs and uniform labels of ``classes`` classes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *input_shape), generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(x, y)


def batches_of(dataset: TensorDataset, batch_size: int) -> list[Batch]:
    """The dataset as a list of (x, y) batches, in order (what the statistics pass and BN recalibration read)."""
    x, y = dataset.tensors
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether BatchNorm recalibration applies (the CNN; the MLP has no normalisation, the ViT only LayerNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
