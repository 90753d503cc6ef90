"""An input normalisation put in front of a network that expects normalised inputs, so that it takes images in
[0, 1] like the rest of tsc_fast (the constants are not weights: they stay out of the state dict)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel (constants, not saved in the state_dict)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"need as many positive stds as means, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A network that expects normalised inputs, made to take images in [0, 1]: ``network(normalize(x))``."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))
