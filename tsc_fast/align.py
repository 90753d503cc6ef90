"""Un-align and re-align: permutations that minimise / maximise unit correlation, applied to whole models.

Un-align permutes a copy of a model so that each unit is as uncorrelated as possible with the same-index unit of
the original; re-align permutes a model so that its units match a reference's. Both keep the permuted model's
function unchanged, which is checked on a batch of the data unless the caller turns it off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from . import assign
from .batches import batch_inputs, to_device
from .modes import eval_mode
from .spec import PermutationSpec, permute
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


def _solve_groups(costs: dict[str, torch.Tensor], maximize: bool, backend: str) -> dict[str, np.ndarray]:
    names = list(costs)
    matrices = [costs[g].cpu().numpy() for g in names]
    if backend in ("auto", "native"):
        perms = assign.solve_many(matrices, maximize=maximize)
    else:
        perms = [assign.solve(m, maximize=maximize, backend=backend) for m in matrices]
    return dict(zip(names, perms))


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
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= rtol:
        raise FunctionChangedError(f"permutation changed the model's outputs: relative error {err:.3g} > {rtol:g}")
    return err


def _first_inputs(batches: Iterable[Any], device) -> torch.Tensor:
    return batch_inputs(to_device(next(iter(batches)), device))


def _align(model: nn.Module, spec: PermutationSpec, gather_costs, maximize: bool, batches: Iterable[Any],
           backend: str, device, verify: bool) -> Alignment:
    t0 = time.perf_counter()
    costs = gather_costs()
    t1 = time.perf_counter()
    perms = _solve_groups(costs, maximize=maximize, backend=backend)
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
