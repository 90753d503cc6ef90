"""Correlation statistics of every permutation group's units, gathered in ONE pass over the data.

Features arrive through the spec's taps during the forward pass and are folded into streaming accumulators at
once (no feature map is kept), so the pass costs little more than plain inference.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from .batches import batch_inputs, to_device
from .modes import eval_mode
from .kernels.correlation import CorrelationAccumulator
from .spec import PermutationSpec, forward_with_taps

OBJECTIVES = ("correlation", "second_moment")


def _finalise(acc: CorrelationAccumulator, objective: str) -> torch.Tensor:
    if objective == "correlation":
        return acc.pearson()
    if objective == "second_moment":
        return acc.second_moment()
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


@torch.no_grad()
def self_correlations(model: nn.Module, spec: PermutationSpec, batches: Iterable[Any],
                      objective: str = "correlation", device: torch.device | str = "cpu",
                      accum_dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """For each group, the (C x C) correlation of its units with themselves over all batches (eval mode)."""
    accumulators = {g: CorrelationAccumulator(n, device=device, dtype=accum_dtype) for g, n in spec.groups.items()}

    def fold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        accumulators[group].update(features, channel_axis=channel_axis)

    with eval_mode(model):
        for batch in batches:
            forward_with_taps(model, spec, batch_inputs(to_device(batch, device)), fold)
    return {g: _finalise(acc, objective) for g, acc in accumulators.items()}


@torch.no_grad()
def cross_correlations(reference: nn.Module, other: nn.Module, spec: PermutationSpec, batches: Iterable[Any],
                       objective: str = "correlation", device: torch.device | str = "cpu",
                       accum_dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """For each group, corr[i, j] between unit i of ``reference`` and unit j of ``other`` on the same inputs.

    The reference's tapped features of a batch are held (one tensor per group) until ``other`` has run on the
    same batch; then both are folded into the accumulator.
    """
    accumulators = {g: CorrelationAccumulator(n, n, device=device, dtype=accum_dtype) for g, n in spec.groups.items()}
    held: dict[str, torch.Tensor] = {}

    def hold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        held[group] = features.detach().clone()

    def fold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        accumulators[group].update(held.pop(group), features, channel_axis=channel_axis)

    with eval_mode(reference), eval_mode(other):
        for batch in batches:
            x = batch_inputs(to_device(batch, device))
            forward_with_taps(reference, spec, x, hold)
            forward_with_taps(other, spec, x, fold)
            if held:
                raise RuntimeError(f"taps fired on the reference but not on the other model: {sorted(held)}")
    return {g: _finalise(acc, objective) for g, acc in accumulators.items()}
