"""Un-align and re-align: permutations that minimise / maximise unit correlation, applied to whole models.

Un-align permutes a copy of a model so that each unit is as uncorrelated as possible with the same-index unit of
the original; re-align permutes a model so that its units match a reference's. Both keep the permuted model's
function unchanged, which is checked on a batch of the data unless the caller turns it off.

Attention groups (``spec.heads``) are assigned head-aware (:func:`solve_heads`): heads move whole, one head order
for an attention layer's query/key and value/output groups, a free order inside each head per group -- the only
permutations that keep a transformer's function.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from . import assign
from . import distributed as ddp
from .batches import batch_inputs, to_device
from .module_tools import eval_mode
from .spec import PermutationSpec, head_permutation, permute
from .stats import cross_correlations, self_correlations


class FunctionChangedError(RuntimeError):
    """A permutation changed what the model computes: a bug in the permutation spec, never expected."""


@dataclass
class Alignment:
    """A permuted model and how it was found."""

    model: nn.Module
    perms: dict[str, np.ndarray]
    cost_identity: dict[str, float]      # summed correlation of the identity assignment, per group
    cost_achieved: dict[str, float]      # summed correlation of the chosen assignment, per group
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"cost_identity": self.cost_identity, "cost_achieved": self.cost_achieved, "seconds": self.seconds}


def _solve_batch(matrices: list[np.ndarray], maximize: bool, backend: str,
                 threads: int | None = None) -> list[np.ndarray]:
    """Optimal assignments of many independent cost matrices (the native solver runs them in parallel threads)."""
    if not matrices:
        return []
    return [np.asarray(p, dtype=np.int64)
            for p in assign.solve_many(matrices, maximize=maximize, threads=threads, backend=backend)]


def head_blocks(cost: np.ndarray, num_heads: int) -> np.ndarray:
    """(H*d, H*d) cost -> (H, H, d, d) blocks: ``blocks[a, b]`` pairs the units of head a (rows, reference) with
    those of head b (columns, the model being permuted)."""
    size = cost.shape[0]
    if cost.shape != (size, size) or size % num_heads:
        raise ValueError(f"a head-structured cost must be square with a multiple of {num_heads} rows, got "
                         f"{cost.shape}")
    d = size // num_heads
    return cost.reshape(num_heads, d, num_heads, d).transpose(0, 2, 1, 3)


def solve_heads(costs: list[np.ndarray], num_heads: int, maximize: bool,
                backend: str = "auto") -> list[np.ndarray]:
    """Head-aware assignment of groups that share one head order (an attention layer's query/key and value/output
    groups): a permutation of heads, and inside each head a free permutation per group.

    Level 1: for every (reference head a, model head b) pair and every group, the optimal within-head assignment
    of the (d x d) block -- all H*H*len(costs) small problems in one batch. Level 2: one (H x H) assignment over
    the head-pair optimal values summed over the groups, so both groups move heads in the same order. Exact: the
    best head-respecting permutation, as the groups' within-head choices are independent once heads are paired.
    Returns one permutation per group (new unit i = old unit perm[i]), each built with ``head_permutation``.
    """
    blocks = [head_blocks(np.asarray(c, dtype=np.float64), num_heads) for c in costs]
    d = blocks[0].shape[-1]
    flat = [np.ascontiguousarray(b[a, h]) for b in blocks for a in range(num_heads) for h in range(num_heads)]
    within = np.stack(_solve_batch(flat, maximize, backend)).reshape(len(costs), num_heads, num_heads, d)
    pair_value = np.zeros((num_heads, num_heads))
    for part, b in enumerate(blocks):  # value of each head pair's optimal within-head assignment
        pair_value += np.take_along_axis(b, within[part][..., None], axis=3)[..., 0].sum(-1)
    head_perm = _solve_batch([pair_value], maximize, backend)[0]
    return [head_permutation(head_perm, within[part][np.arange(num_heads), head_perm]) for part in range(len(costs))]


def solve_groups(costs: dict[str, Any], spec: PermutationSpec, maximize: bool, backend: str = "auto",
                 threads: int | None = None) -> dict[str, np.ndarray]:
    """Every group's assignment (tensors or arrays in): plain groups solved together in one batch (on ``threads``
    solver threads; None: the solver's default), head-structured groups per attention layer with the two-level
    :func:`solve_heads`."""
    matrices = {g: c.detach().cpu().double().numpy() if torch.is_tensor(c) else np.asarray(c, dtype=np.float64)
                for g, c in costs.items()}
    headed = {g for entry in spec.heads.values() for g in entry["groups"]}
    plain = [g for g in matrices if g not in headed]
    perms = dict(zip(plain, _solve_batch([matrices[g] for g in plain], maximize, backend, threads)))
    for entry in spec.heads.values():
        groups = entry["groups"]
        perms.update(zip(groups, solve_heads([matrices[g] for g in groups], entry["num_heads"], maximize, backend)))
    return perms


def _assignment_costs(costs: dict[str, torch.Tensor], perms: dict[str, np.ndarray]) -> tuple[dict, dict]:
    identity, achieved = {}, {}
    for g, c in costs.items():
        c = c.cpu().numpy()
        identity[g] = float(np.trace(c))
        achieved[g] = float(c[np.arange(len(perms[g])), perms[g]].sum())
    return identity, achieved


@torch.no_grad()
def verify_same_function(original: nn.Module, permuted: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """Relative output difference ||f'(x) - f(x)|| / ||f(x)|| in eval mode; raises FunctionChangedError over rtol."""
    with eval_mode(original), eval_mode(permuted):
        ref, out = original(x), permuted(x)
    if not bool(torch.isfinite(ref).all()):  # not the permutation's fault: say what is
        raise FloatingPointError("the model's outputs on the clean data are NaN/inf before any permutation: "
                                 "check the data and the weights for NaN/inf or overflowing values")
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= rtol:
        raise FunctionChangedError(f"permutation changed the model's outputs: relative error {err:.3g} > {rtol:g}")
    return err


VERIFY_SAMPLES = 16  # a wrong permutation changes every output: a few samples show it as well as a whole batch


def _first_inputs(batches: Iterable[Any], device) -> torch.Tensor:
    """The first ``VERIFY_SAMPLES`` inputs of the first batch (on ViT-B/16 a whole batch cost more than the
    assignments it checks)."""
    x = batch_inputs(next(iter(batches)))
    return to_device(x[:VERIFY_SAMPLES] if torch.is_tensor(x) and x.dim() else x, device)


def _align(model: nn.Module, spec: PermutationSpec, gather_costs, maximize: bool, batches: Iterable[Any],
           backend: str, device, verify: bool) -> Alignment:
    t0 = time.perf_counter()
    costs = gather_costs()
    t1 = time.perf_counter()
    # costs are pooled over all ranks, so one rank solves and the others receive the answer
    perms = ddp.broadcast_object(solve_groups(costs, spec, maximize=maximize, backend=backend)
                                 if ddp.is_main() else None)
    t2 = time.perf_counter()
    permuted = permute(model, spec, perms)
    t3 = time.perf_counter()
    if verify:
        verify_same_function(model, permuted, _first_inputs(batches, device))
    identity, achieved = _assignment_costs(costs, perms)
    seconds = {"stats": t1 - t0, "assign": t2 - t1, "permute": t3 - t2, "verify": time.perf_counter() - t3}
    return Alignment(permuted, perms, identity, achieved, seconds)


def unalign(model: nn.Module, spec: PermutationSpec, batches: Iterable[Any], objective: str = "correlation",
            backend: str = "auto", device="cpu", verify: bool = True) -> Alignment:
    """A permuted copy of ``model`` whose units are as uncorrelated as possible with the original's.

    The copy's features are the original's, permuted, so one pass of self-statistics gives every cost matrix.
    """
    def gather_costs():
        return self_correlations(model, spec, batches, objective=objective, device=device)

    return _align(model, spec, gather_costs, False, batches, backend, device, verify)


def realign(model: nn.Module, reference: nn.Module, spec: PermutationSpec, batches: Iterable[Any],
            objective: str = "correlation", backend: str = "auto", device="cpu", verify: bool = True) -> Alignment:
    """A permuted copy of ``model`` whose units match ``reference``'s as closely as possible (max correlation).

    cost[i, j] correlates unit i of the reference with unit j of ``model``; new unit i of the copy is old unit
    perm[i], so the copy's unit i is the one most correlated with the reference's unit i overall.
    """
    def gather_costs():
        return cross_correlations(reference, model, spec, batches, objective=objective, device=device)

    return _align(model, spec, gather_costs, True, batches, backend, device, verify)
