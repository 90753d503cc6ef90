"""Applying permutations to state dicts and models; random permutations; the invariance check."""
from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from ..module_tools import eval_mode
from ._ties import alias_sets, merge_aliases, tensor_aliases
from ._types import AxisRef, InvarianceError, PermutationSpec


def as_permutation(perm, size: int, group: str) -> np.ndarray:
    """``perm`` (ndarray, tensor or sequence) as an int64 ndarray, checked to be a permutation of ``range(size)``."""
    if isinstance(perm, torch.Tensor):
        perm = perm.detach().cpu().numpy()
    array = np.asarray(perm)
    if array.ndim != 1:
        raise ValueError(f"permutation of group {group!r} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"permutation of group {group!r} must hold integers, got dtype {array.dtype}")
    if array.shape[0] != size:
        raise ValueError(f"permutation of group {group!r} has length {array.shape[0]}, the group has {size} units")
    array = array.astype(np.int64, copy=False)
    if size and (array.min() < 0 or array.max() >= size or np.bincount(array, minlength=size).max() != 1):
        raise ValueError(f"permutation of group {group!r} is not a permutation of 0..{size - 1} "
                         "(values out of range or repeated)")
    return array


def validate_perms(spec: PermutationSpec, perms: Mapping) -> dict[str, np.ndarray]:
    """Check ``perms`` names exactly the spec's groups and holds valid permutations; returns int64 ndarrays."""
    missing = [g for g in spec.groups if g not in perms]
    unknown = [g for g in perms if g not in spec.groups]
    if missing:
        raise ValueError(f"no permutation given for groups {missing} (pass np.arange(n) to keep a group as is)")
    if unknown:
        raise ValueError(f"permutations given for unknown groups {unknown}; spec groups: {list(spec.groups)}")
    checked = {g: as_permutation(perms[g], n, g) for g, n in spec.groups.items()}
    for path, entry in spec.heads.items():
        _check_head_structure(path, entry, checked)
    return checked


def head_order(perm: np.ndarray, num_heads: int, group: str) -> np.ndarray:
    """The head permutation inside a head-structured permutation; ValueError if heads are not kept whole."""
    head_dim = perm.shape[0] // num_heads
    source_heads = perm.reshape(num_heads, head_dim) // head_dim
    if not (source_heads == source_heads[:, :1]).all():
        raise ValueError(f"permutation of group {group!r} splits attention heads: each block of {head_dim} units "
                         "(one head) must come from a single old head")
    return source_heads[:, 0]


def _check_head_structure(path: str, entry: dict, perms: dict[str, np.ndarray]) -> None:
    orders = [(g, head_order(perms[g], entry["num_heads"], g)) for g in entry["groups"]]
    for (g0, o0), (g1, o1) in zip(orders, orders[1:]):
        if not np.array_equal(o0, o1):
            raise ValueError(f"groups {g0!r} and {g1!r} of attention {path!r} must move heads in the same order")


def head_permutation(head_perm, within_head_perms) -> np.ndarray:
    """Compose a head-structured permutation: new head h = old head ``head_perm[h]``, and within new head h,
    new unit j = old unit ``within_head_perms[h][j]`` of that old head."""
    head_perm = np.asarray(head_perm, dtype=np.int64)
    within = np.asarray(within_head_perms, dtype=np.int64)
    if within.ndim != 2 or within.shape[0] != head_perm.shape[0]:
        raise ValueError(f"within_head_perms must have one row per head ({head_perm.shape[0]}), got {within.shape}")
    head_dim = within.shape[1]
    return (head_perm[:, None] * head_dim + within).reshape(-1)


def identity_permutations(spec: PermutationSpec) -> dict[str, np.ndarray]:
    return {g: np.arange(n, dtype=np.int64) for g, n in spec.groups.items()}


def random_permutations(spec: PermutationSpec, seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
    """A random permutation for every group; never the identity for groups of 2 units or more."""
    rng = np.random.default_rng(seed)
    perms = {}
    for g, n in spec.groups.items():
        perms[g] = _non_identity(rng, n)
    for entry in spec.heads.values():  # head-structured groups: one head order, free order within heads
        num_heads = entry["num_heads"]
        order = _non_identity(rng, num_heads)
        for g in entry["groups"]:
            head_dim = spec.groups[g] // num_heads
            perms[g] = head_permutation(order, [_non_identity(rng, head_dim) for _ in range(num_heads)])
    return perms


def _non_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    perm = rng.permutation(n)
    while n > 1 and np.array_equal(perm, np.arange(n)):
        perm = rng.permutation(n)
    return perm.astype(np.int64)


def _axis_indices(length: int, pieces: list[tuple[AxisRef, np.ndarray]], name: str) -> np.ndarray:
    """Gather index along one tensor axis: identity, with each group's range replaced by its permuted blocks."""
    index = np.arange(length, dtype=np.int64)
    for ref, perm in pieces:
        span = perm.shape[0] * ref.block
        if ref.offset + span > length:
            raise ValueError(f"spec axis {ref} of tensor {name!r} needs {ref.offset + span} entries along dim "
                             f"{ref.dim}, the tensor has {length}")
        blocks = ref.offset + perm[:, None] * ref.block + np.arange(ref.block, dtype=np.int64)[None, :]
        index[ref.offset:ref.offset + span] = blocks.reshape(-1)
    return index


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping) -> dict[str, torch.Tensor]:
    """A new state dict with every group's axes permuted: new unit i = old unit ``perms[group][i]``.

    All names of one tied tensor -- ``spec.aliases``, and names of ``state_dict`` holding the same memory as the
    same view -- get the same permuted tensor (one object), so loading the result keeps the tie. A spec that
    permutes two names of one tensor differently is refused (ValueError): no state dict could hold both.
    Pure: the input is not modified; tensors no group touches are shared with it (not copied).
    """
    checked = validate_perms(spec, perms)
    names_of = _tied_names(state_dict, spec.aliases)
    per_axis: dict[tuple[str, int], list[tuple[AxisRef, np.ndarray, str]]] = {}
    for group, refs in spec.axes.items():
        for ref in refs:
            name = _present_name(ref.name, state_dict, names_of, group)
            per_axis.setdefault((name, ref.dim), []).append((ref, checked[group], group))
    _check_ties_permuted_alike(per_axis, names_of)
    result = dict(state_dict)
    for (name, dim), pieces in per_axis.items():
        tensor = result[name]
        if not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"spec permutes dim {dim} of {name!r}, which has shape {tuple(tensor.shape)}")
        index = _axis_indices(tensor.shape[dim], [(ref, perm) for ref, perm, _ in pieces], name)
        result[name] = tensor.index_select(dim, torch.from_numpy(index).to(tensor.device))
    for name in {name for name, _ in per_axis}:  # every other name of a permuted tensor: the same new tensor
        for other in names_of.get(name, ()):
            if other != name and other in result:
                result[other] = result[name]
    return result


def _tied_names(state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, list[str]]:
    """name -> all names of its tensor, for every name of a tied tensor (declared by the spec or sharing memory)."""
    merged = merge_aliases(aliases, tensor_aliases(state_dict))
    return {name: members for members in alias_sets(merged).values() for name in members}


def _present_name(name: str, state_dict: Mapping, names_of: dict[str, list[str]], group: str) -> str:
    """The name under which the state dict holds the tensor a spec axis names (the name, or another of its tensor)."""
    if name in state_dict:
        return name
    present = [other for other in names_of.get(name, ()) if other in state_dict]
    if not present:
        raise KeyError(f"spec group {group!r} permutes {name!r}, which is not in the state dict")
    return present[0]


def _check_ties_permuted_alike(per_axis: dict[tuple[str, int], list[tuple[AxisRef, np.ndarray, str]]],
                               names_of: dict[str, list[str]]) -> None:
    """Names of one tensor must be permuted identically (same groups, axes, blocks), or only one of them named."""
    moves: dict[str, set] = {}
    for (name, dim), pieces in per_axis.items():
        moves.setdefault(name, set()).update((dim, ref.block, ref.offset, group) for ref, _, group in pieces)
    for name, move in moves.items():
        for other in names_of.get(name, ()):
            if other != name and other in moves and moves[other] != move:
                raise ValueError(
                    f"{name!r} and {other!r} are one tensor (tied), but the spec permutes them differently "
                    f"({name!r}: {_describe_moves(move)}; {other!r}: {_describe_moves(moves[other])}), which no "
                    "state dict can hold: loading it would keep only one name's version. Rediscover the spec "
                    "(discover() links the names of a tied tensor) or name the tensor once, with spec.aliases.")


def _describe_moves(move: set) -> str:
    return ", ".join(f"dim {dim} by group {group!r}" + (f" in blocks of {block}" if block != 1 else "") +
                     (f" at {offset}" if offset else "") for dim, block, offset, group in sorted(move))


def permute(model: nn.Module, spec: PermutationSpec, perms: Mapping) -> nn.Module:
    """A deep copy of ``model`` with its weights, biases and BN buffers permuted (same function).

    Tied tensors stay tied: the copy shares a parameter wherever the model does (deepcopy keeps shared objects),
    and every name of it is loaded with the same permuted tensor.
    """
    permuted_state = permute_state_dict(model.state_dict(), spec, perms)
    clone = copy.deepcopy(model)
    clone.load_state_dict(permuted_state, strict=True)
    return clone


def _output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _output_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _output_tensors(v)]
    return []


def relative_error(output, reference) -> float:
    """||output - reference|| / ||reference|| (Frobenius, in float64) over all tensors of (nested) outputs."""
    outs, refs = _output_tensors(output), _output_tensors(reference)
    if len(outs) != len(refs) or not refs:
        raise ValueError("outputs to compare hold different numbers of tensors (or none)")
    diff = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs))
    norm = sum(float(r.double().pow(2).sum()) for r in refs)
    return float(np.sqrt(diff) / max(np.sqrt(norm), np.finfo(np.float64).tiny))


def check_invariance(model: nn.Module, spec: PermutationSpec, example_input, rtol: float = 1e-5,
                     seed: int = 0, trials: int = 1) -> float:
    """Permute every group at random and check the outputs are unchanged; returns the largest relative error.

    The permuted model is built by :func:`permute` itself -- the very model a user gets -- and both run in eval
    mode, so a spec that permutes one name of a tied tensor differently from another cannot pass (each module's
    train/eval flag is restored afterwards; the model's own tensors are untouched; one permuted copy of the model
    exists at a time). Relative error is ``||out_permuted - out|| / ||out||`` (Frobenius norm over all output
    tensors, in float64). Raises :class:`InvarianceError` when it exceeds ``rtol`` in any trial.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    worst = 0.0
    with eval_mode(model), torch.no_grad():
        reference = model(*inputs)
    for trial in range(trials):
        permuted = permute(model, spec, random_permutations(spec, seed + trial)).eval()
        with torch.no_grad():
            output = permuted(*inputs)
        del permuted
        error = relative_error(output, reference)
        worst = max(worst, error)
        if not error <= rtol:  # also catches NaN
            raise InvarianceError(
                f"random permutation of {len(spec.groups)} groups changed the output: relative error "
                f"{error:.3g} > rtol {rtol:g} (trial {trial}, seed {seed + trial}); the spec is wrong for this "
                "model")
    return worst
