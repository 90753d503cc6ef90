"""The one optimisation loop behind curve training and fine-tuning: SGD, cosine schedule, progress bar."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .batches import augment_batch, to_device


def cosine_factor(epoch: int, t_max: int) -> float:
    """CosineAnnealingLR's factor at ``epoch`` (eta_min 0). Past t_max it rises again, as torch's does."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


def optimise(params: Sequence[torch.Tensor], batches: Iterable[Any], epochs: int,
             step_loss: Callable[[Any, torch.Generator], torch.Tensor], *, lr: float, momentum: float = 0.9,
             weight_decay: float = 0.0, t_max: int | None = None, augment_shift: int = 0, seed: int = 0,
             device: torch.device | str = "cpu", desc: str = "train", progress: bool = True) -> list[float]:
    """Run ``epochs`` passes of SGD over ``batches``; returns the mean loss of every epoch.

    ``step_loss(batch, generator)`` computes the loss of one (augmented, on-device) batch; the generator is the
    loop's seeded source of randomness (curve training draws t from it). The learning rate follows a cosine
    schedule stepped per epoch with period ``t_max`` epochs (default: ``epochs``).
    """
    if epochs <= 0:
        return []
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    t_max = t_max or epochs
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, unit="ep")
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_factor(epoch, t_max)
        total, count = 0.0, 0
        for batch in batches:
            batch = augment_batch(to_device(batch, device), augment_shift, generator)
            loss = step_loss(batch, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {float(loss)} at epoch {epoch}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            count += 1
        epoch_losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    return epoch_losses
