"""Training a plain classifier: the victims' trainer (Adam, cross-entropy, seeded batch order), also used for the
surrogate model of the label-consistent attack."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..module_tools import model_device


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random split of ``range(n)`` into batches; a final batch of one joins the previous one.

    (BatchNorm cannot normalise a batch of one in training mode.)
    """
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy on ``(x, y)``; returns it in eval mode.

    Deterministic for a given seed (batch order and any dropout); the global torch RNG is left untouched.
    Runs on the model's device.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if len(x) < 2:
        raise ValueError("need at least 2 training images")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    cuda_devices = [device] if device.type == "cuda" else []
    model.train()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
        for _ in bar:
            total_loss = 0.0
            for batch in shuffled_batches(len(x), batch_size, generator):
                batch = batch.to(device)
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
            bar.set_postfix(loss=f"{total_loss / len(x):.4f}")
    return model.eval()
