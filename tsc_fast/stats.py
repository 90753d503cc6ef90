"""Correlation statistics of every permutation group's units, gathered in ONE pass over the data.

Features arrive through the spec's taps during the forward pass and are folded into streaming accumulators at
once, so the pass costs little more than plain inference. Memory stays near plain inference's: features are fed
to the accumulators a slice of samples at a time (their float64 copies stay small), and cross-statistics, which
must hold the reference's features until the other model has produced its own, run each batch in a few
micro-batches sized so that the held features take about what plain inference needs anyway (pooled statistics
do not depend on how the samples are split; small micro-batches would cost CPU time, large ones memory).

Attention groups (``spec.heads``): the (H*d x H*d) matrix of a query/key or value/output group is the set of its
per-head blocks, ``corr[a*d:(a+1)*d, b*d:(b+1)*d]`` correlating head a of one model with head b of the other --
exactly what the head-aware assignment (``align.solve_heads``) consumes.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from .batches import batch_inputs, to_device
from .kernels.correlation import CorrelationAccumulator
from .module_tools import eval_mode
from .spec import PermutationSpec, forward_with_taps

OBJECTIVES = ("correlation", "second_moment")
UPDATE_CHUNK_BYTES = 16 * 2 ** 20   # features fed to an accumulator per update: bounds its float64 temporaries
HOLD_MIN_BYTES = 64 * 2 ** 20       # held reference features may always take this much


def _split_inputs(x, start: int, stop: int):
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return tuple(t[start:stop] if isinstance(t, torch.Tensor) else t for t in x)


def _num_samples(x) -> int:
    first = x if isinstance(x, torch.Tensor) else next(t for t in x if isinstance(t, torch.Tensor))
    return first.shape[0] if first.dim() else 1


def _update_in_chunks(acc: CorrelationAccumulator, x: torch.Tensor, y: torch.Tensor | None,
                      channel_axis: int) -> None:
    """Fold features into ``acc`` a slice of samples (dim 0) at a time, so that the accumulator's float64 copies
    stay small however large the batch's feature map is (pooled statistics do not depend on the slicing)."""
    if x.dim() < 2 or channel_axis % x.dim() == 0:
        acc.update(x, y, channel_axis=channel_axis)
        return
    per_sample = max(1, x[:1].numel() * x.element_size())
    step = max(1, UPDATE_CHUNK_BYTES // per_sample)
    for start in range(0, x.shape[0], step):
        acc.update(x[start:start + step], None if y is None else y[start:start + step], channel_axis=channel_axis)


def _probe_feature_bytes(model: nn.Module, spec: PermutationSpec, x) -> tuple[int, int]:
    """(bytes of all groups' tapped features, bytes of the largest one) for ONE sample: a probe forward."""
    sizes = []

    def count(group: str, features: torch.Tensor, channel_axis: int) -> None:
        sizes.append(features.numel() * features.element_size())

    forward_with_taps(model, spec, _split_inputs(x, 0, 1), count)
    return sum(sizes), max(sizes, default=0)


def _check_micro_batch(size) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"micro_batch must be a positive int or None (automatic), got {size!r}")


def _micro_batches(x, size: int):
    total = _num_samples(x)
    if size >= total:
        yield x
        return
    for start in range(0, total, size):
        yield _split_inputs(x, start, start + size)


def _auto_hold_micro_batch(model: nn.Module, spec: PermutationSpec, x) -> int:
    """Samples per forward for cross-statistics: the held features of all groups (``per_sample`` bytes a sample)
    may take as much as two copies of the largest tapped feature map of the whole batch -- memory that plain
    inference of the batch needs anyway (a layer's input and output) -- and at least ``HOLD_MIN_BYTES``."""
    per_sample, largest = _probe_feature_bytes(model, spec, x)
    budget = max(HOLD_MIN_BYTES, 2 * largest * _num_samples(x))
    return max(1, budget // max(per_sample, 1))


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def _unit_channels(spec: PermutationSpec, group: str) -> int:
    tap = spec.taps.get(group)
    return tap.unit_channels if tap is not None else 1


def _channels(spec: PermutationSpec) -> dict[str, int]:
    """Feature channels per group: units times channels per unit (units moving as blocks of channels)."""
    return {g: n * _unit_channels(spec, g) for g, n in spec.groups.items()}


def _per_unit(matrix: torch.Tensor, spec: PermutationSpec, group: str) -> torch.Tensor:
    """Channel statistics -> unit statistics. A unit of ``b`` channels moves as a block with its order kept, so
    matching unit u to unit v pairs channel u*b+k with v*b+k: the entry is the mean of those ``b`` pairs."""
    block = _unit_channels(spec, group)
    if block == 1:
        return matrix
    units = matrix.shape[0] // block
    return matrix.reshape(units, block, units, block).diagonal(dim1=1, dim2=3).mean(-1)


def _finalise(acc: CorrelationAccumulator, objective: str) -> torch.Tensor:
    if objective == "correlation":
        return acc.pearson()
    if objective == "second_moment":
        return acc.second_moment()
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def _pooled(accumulators: dict[str, CorrelationAccumulator], objective: str,
            spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Each group's matrix from statistics pooled over every rank of a torch.distributed group (sums, not an
    average of per-rank correlations; a no-op in a single process)."""
    for acc in accumulators.values():
        acc.all_reduce()
    return {g: _per_unit(_finalise(acc, objective), spec, g) for g, acc in accumulators.items()}


@torch.no_grad()
def self_correlations(model: nn.Module, spec: PermutationSpec, batches: Iterable[Any],
                      objective: str = "correlation", device: torch.device | str = "cpu",
                      accum_dtype: torch.dtype = torch.float64,
                      micro_batch: int | None = None) -> dict[str, torch.Tensor]:
    """For each group, the (C x C) correlation of its units with themselves over all batches (eval mode).

    ``micro_batch``: samples per forward pass (None: whole batches -- features are folded as they appear, a slice
    of samples at a time, so nothing but the forward's own activations grows with the batch). The result does
    not depend on it beyond floating-point rounding.
    """
    _check_objective(objective)
    _check_micro_batch(micro_batch)
    accumulators = {g: CorrelationAccumulator(c, device=device, dtype=accum_dtype) for g, c in _channels(spec).items()}

    def fold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        _update_in_chunks(accumulators[group], features, None, channel_axis)

    with eval_mode(model):
        for batch in batches:
            x = batch_inputs(to_device(batch, device))
            for part in _micro_batches(x, micro_batch or _num_samples(x)):
                forward_with_taps(model, spec, part, fold)
    return _pooled(accumulators, objective, spec)


@torch.no_grad()
def cross_correlations(reference: nn.Module, other: nn.Module, spec: PermutationSpec, batches: Iterable[Any],
                       objective: str = "correlation", device: torch.device | str = "cpu",
                       accum_dtype: torch.dtype = torch.float64,
                       micro_batch: int | None = None) -> dict[str, torch.Tensor]:
    """For each group, corr[i, j] between unit i of ``reference`` and unit j of ``other`` on the same inputs.

    The reference's tapped features of a micro-batch are held (one tensor per group) until ``other`` has run on
    the same micro-batch; then both are folded into the accumulator. ``micro_batch``: samples per forward pass;
    None: automatic, measured once by a one-sample probe forward -- the held features may take about as much
    memory as two copies of the batch's largest feature map (see ``_auto_hold_micro_batch``), so the pass's peak
    stays near plain inference's. Inputs are split along their first dimension, which must be the batch's (as in
    any DataLoader batch); for other layouts pass ``micro_batch`` >= the batch size.
    """
    _check_objective(objective)
    _check_micro_batch(micro_batch)
    accumulators = {g: CorrelationAccumulator(c, c, device=device, dtype=accum_dtype)
                    for g, c in _channels(spec).items()}
    held: dict[str, torch.Tensor] = {}
    size = micro_batch

    def hold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        held[group] = features.detach().clone()  # later in-place ops of the forward would overwrite it

    def fold(group: str, features: torch.Tensor, channel_axis: int) -> None:
        _update_in_chunks(accumulators[group], held.pop(group), features, channel_axis)

    with eval_mode(reference), eval_mode(other):
        for batch in batches:
            x = batch_inputs(to_device(batch, device))
            if size is None:
                size = _auto_hold_micro_batch(reference, spec, x)
            for part in _micro_batches(x, size):
                forward_with_taps(reference, spec, part, hold)
                forward_with_taps(other, spec, part, fold)
                if held:
                    raise RuntimeError(f"taps fired on the reference but not on the other model: {sorted(held)}")
    return _pooled(accumulators, objective, spec)
