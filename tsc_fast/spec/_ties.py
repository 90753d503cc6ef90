"""Tied tensors: state_dict names that refer to one tensor (a shared Parameter or buffer, e.g. a language model's
embedding reused as its output layer, ``head.weight = embed.weight``).

``model.state_dict()`` lists such a tensor once per name, so each name looks like a tensor of its own. A spec must
permute all names of one tensor the same way, and a permuted state dict must give them all the same tensor --
otherwise ``load_state_dict`` writes the names one after another into the one parameter and the last one wins.

Names are tied when they hold the same object, or views of the same memory with the same offset, shape, strides
and dtype (what ``state_dict()`` returns for a shared Parameter: one detached view per name). The canonical name of
a tied tensor is its first name in state_dict order (the name torch.fx gives it, too); the others are its aliases.
Names whose memory overlaps without being the same view (one a transpose or slice of the other) cannot be related
axis by axis: discovery refuses to permute them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


def _has_memory(tensor: torch.Tensor) -> bool:
    """Whether the tensor has plain strided memory to compare (not meta, sparse, empty or storage-less)."""
    if tensor.device.type == "meta" or tensor.layout != torch.strided or tensor.numel() == 0:
        return False
    try:
        tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _view_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same tensor: their memory and view, or (without real memory) their identity."""
    if not _has_memory(tensor):
        return ("object", id(tensor))
    return ("view", tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def tensor_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """alias name -> canonical name (its first name in ``state``'s order) for every name holding an earlier tensor."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        canonical = first.setdefault(_view_key(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def overlapping_views(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pairs of names whose memory overlaps although they are different views (a transpose, a slice, ...)."""
    spans: dict[tuple, list[tuple[int, int, tuple, str]]] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not _has_memory(tensor):
            continue
        size = tensor.element_size()
        start = tensor.storage_offset() * size
        extent = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) + 1
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        spans.setdefault(key, []).append((start, start + extent * size, _view_key(tensor), name))
    pairs = []
    for items in spans.values():  # sweep by start: each span against the furthest-reaching earlier one
        items.sort(key=lambda item: item[0])
        reach_end, reach_key, reach_name = -1, None, ""
        for start, end, key, name in items:
            if start < reach_end and key != reach_key:
                pairs.append((reach_name, name))
            if end > reach_end:
                reach_end, reach_key, reach_name = end, key, name
    return pairs


def alias_sets(aliases: Mapping[str, str]) -> dict[str, list[str]]:
    """canonical name -> all names of that tensor (canonical first), for the tensors that have aliases."""
    sets: dict[str, list[str]] = {}
    for alias, canonical in aliases.items():
        sets.setdefault(canonical, [canonical]).append(alias)
    return sets


def merge_aliases(*sources: Mapping[str, str]) -> dict[str, str]:
    """Union of several alias maps, resolved so that every alias points at one canonical name (no chains)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    order: dict[str, int] = {}
    for source in sources:
        for alias, canonical in source.items():
            order.setdefault(canonical, len(order))
            order.setdefault(alias, len(order))
            a, c = find(alias), find(canonical)
            if a != c:  # the name met first stays canonical
                first, second = (a, c) if order[a] < order[c] else (c, a)
                parent[second] = first
    return {name: find(name) for name in order if find(name) != name}


def describe_tie(canonical: str, members: list[str]) -> str:
    """``'embed.weight' (also named 'head.weight')``."""
    others = ", ".join(repr(m) for m in members if m != canonical)
    return f"{canonical!r} (also named {others})"
