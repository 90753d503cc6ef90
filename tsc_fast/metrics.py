"""Defense metrics with BackdoorBench's definitions, in percent (0-100).

- ACC: accuracy on the clean test set.
- ASR: attack success rate, over the triggered test images whose TRUE label is not the target: the fraction
  classified as the target.
- RA: robust accuracy, over the same triggered images: the fraction classified as their true label.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .module_tools import model_device


class Trigger(Protocol):
    """What the metrics need of an attack: its ``target`` label and ``apply`` (triggered copies of images)."""

    target: int

    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


def triggered_test_set(x: torch.Tensor, y: torch.Tensor, attack: Trigger) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of the test images whose true label is not the target, with their TRUE labels."""
    keep = y != attack.target
    return attack.apply(x[keep]), y[keep]


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs for ``x`` in eval mode, batch by batch, on the CPU; the model's mode is restored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        outputs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (argmax of the logits) for ``x``, in eval mode; the model's mode is restored."""
    if len(x) == 0:
        return torch.empty(0, dtype=torch.int64)
    return logits(model, x, batch_size).argmax(dim=1)


def percent(hits: torch.Tensor) -> float:
    """Percentage of True values in a boolean tensor (NaN for an empty one)."""
    return float(hits.float().mean() * 100) if hits.numel() else float("nan")


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of predictions equal to the labels."""
    return percent(predictions.cpu() == labels.cpu())


def attack_success_rate(triggered_predictions: torch.Tensor, target: int) -> float:
    """Percentage of triggered (non-target-label) images classified as the target."""
    return percent(triggered_predictions.cpu() == target)


def evaluate(
    model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, attack: Trigger, batch_size: int = 512
) -> dict[str, float]:
    """``{"acc", "asr", "ra"}`` in percent: clean accuracy, attack success rate and robust accuracy.

    ASR and RA are measured on triggered copies of the test images whose true label is not ``attack.target``.
    """
    if len(x_test) != len(y_test):
        raise ValueError(f"x_test has {len(x_test)} images but y_test has {len(y_test)} labels")
    clean_predictions = predict(model, x_test, batch_size)
    x_triggered, y_true = triggered_test_set(x_test, y_test, attack)
    triggered_predictions = predict(model, x_triggered, batch_size)
    return {
        "acc": accuracy(clean_predictions, y_test),
        "asr": attack_success_rate(triggered_predictions, attack.target),
        "ra": accuracy(triggered_predictions, y_true),
    }


def loss_metrics(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor,
                 x_triggered: torch.Tensor | None = None,
                 target: int | torch.Tensor | None = None) -> dict[str, float]:
    """Clean cross-entropy and ACC of one model; with triggered images also the poisoned loss (against the target
    label: one class, or one label per image) and ASR: what a loss-landscape profile records at each point."""
    clean = logits(model, x_clean)
    result = {"clean_loss": float(F.cross_entropy(clean, y_clean.cpu())), "acc": accuracy(clean.argmax(1), y_clean)}
    if x_triggered is not None and len(x_triggered):
        triggered = logits(model, x_triggered)
        labels = target.cpu().long() if torch.is_tensor(target) else \
            torch.full((len(x_triggered),), int(target), dtype=torch.long)
        result.update(poison_loss=float(F.cross_entropy(triggered, labels)), asr=accuracy(triggered.argmax(1), labels))
    return result
