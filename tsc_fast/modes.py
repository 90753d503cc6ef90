"""Context managers that set train/eval modes of a model and restore the previous ones afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
