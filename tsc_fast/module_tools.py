"""Small facts about a model used everywhere: where it lives, and a mode switch that restores itself."""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model in eval mode inside; every submodule's previous mode restored after."""
    previous = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in previous.items():
            module.training = mode


def model_device(model: nn.Module, requested: str | torch.device | None = None) -> torch.device:
    """``requested`` if given, else the device of the model's first parameter or buffer (CPU for neither)."""
    if requested is not None:
        return torch.device(requested)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
