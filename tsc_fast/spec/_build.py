"""Spec building: the analysed classes of axes become groups (named after modules), their tensor axes, heads and
taps -- or a refusal that names what stands in the way and the override to use.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from ._analysis import Analysis
from ._axes import AxisClass
from ._tap_choice import Candidate, choose_tap
from ._ties import alias_sets, describe_tie
from ._tracing import describe_node, node_scope
from ._types import AxisRef, PermutationSpec, Tap, UnsupportedOperationError


def build_spec(gm: fx.GraphModule, analysis: Analysis, exclude: tuple[str, ...], tap_at: str,
               aliases: dict[str, str], overlaps: list[tuple[str, str]]) -> PermutationSpec:
    """The PermutationSpec of an analysed model; UnsupportedOperationError where a group cannot be permuted."""
    permutable = permutable_classes(analysis)
    names = group_names(permutable)
    refused = [cls for cls in permutable if cls.requirements]
    if refused:
        raise UnsupportedOperationError("\n".join(_refusal(names[c.root], c) for c in refused))
    _check_disjoint_refs(permutable, names, aliases)
    _refuse_overlapping_views(permutable, names, aliases, overlaps)
    candidates: dict[int, list[Candidate]] = {}
    for axis, node, dim, ndim in analysis.candidates:
        candidates.setdefault(analysis.axes.find(axis), []).append((node, dim, ndim))
    streams = {c.root for c in permutable if c.residual_scopes}
    groups, axes, taps = {}, {}, {}
    attention_taps = {}
    heads = {}
    for path, (num_heads, qk, vo) in analysis.heads.items():
        qk_root, vo_root = analysis.axes.find(qk), analysis.axes.find(vo)
        kept = [names[r] for r in (qk_root, vo_root) if r in names]
        if kept:
            heads[path] = {"num_heads": num_heads, "groups": kept}
        attention_taps[qk_root] = Tap(path, "attn_qk", 0, 0, -1, "")
        attention_taps[vo_root] = Tap(path, "attn_v", 0, 0, -1, "")
    for cls in permutable:
        name = names[cls.root]
        if cls.granularity > 1 and cls.root in attention_taps:
            raise UnsupportedOperationError(f"group {name!r} is both head-structured and moved in blocks of "
                                            f"{cls.granularity}; exclude the module mixing them")
        groups[name] = units(cls)
        axes[name] = sorted((AxisRef(r.name, r.dim, r.block * cls.granularity, r.offset) for r in cls.refs),
                            key=lambda r: (r.name, r.dim, r.offset))
        tap = attention_taps.get(cls.root) or choose_tap(cls, candidates.get(cls.root, []), analysis, gm, tap_at,
                                                         streams)
        if tap is not None:
            taps[name] = dataclasses.replace(tap, unit_channels=cls.granularity)
    return PermutationSpec(groups, axes, taps, exclude, heads, aliases)


def permutable_classes(analysis: Analysis) -> list[AxisClass]:
    """Classes that become groups (not fixed, more than one unit, moving some state_dict tensor), in graph order."""
    classes = analysis.axes.classes()
    return sorted((c for c in classes.values() if c.fixed is None and units(c) > 1 and c.refs),
                  key=lambda c: c.first_seen)


def units(cls: AxisClass) -> int:
    """Units of a class moved in blocks of ``granularity`` entries (1 -- nothing to permute -- if they do not fit)."""
    return cls.size // cls.granularity if cls.size % cls.granularity == 0 else 1


# --- names ------------------------------------------------------------------------------------------------------
def group_names(permutable: list[AxisClass]) -> dict[int, str]:
    """Class root -> group name, unique (``name.1``, ``name.2`` for repeats), in the classes' order."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for cls in permutable:
        names[cls.root] = _unique(_group_name(cls), taken)
    return names


def _group_name(cls: AxisClass) -> str:
    """``<scope>.stream`` for a residual stream, else the first producing module, else the first tensor's module."""
    if cls.residual_scopes:
        prefix = _common_prefix([scope for _, scope in cls.residual_scopes])
        return f"{prefix}.stream" if prefix else "stream"
    if cls.producers:
        return cls.producers[0]
    return cls.refs[0].name.rpartition(".")[0] or cls.refs[0].name


def _common_prefix(paths: list[str]) -> str:
    """The longest common dotted prefix of module paths."""
    parts = [p.split(".") if p else [] for p in paths]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name.k`` with the first k not taken yet; recorded as taken."""
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}.{k}", k + 1
    taken.add(candidate)
    return candidate


# --- refusals ---------------------------------------------------------------------------------------------------
def _refusal(name: str, cls: AxisClass) -> str:
    """Why group ``name`` cannot be proven permutable: the first operations not understood, and the override."""
    first_reason: dict[fx.Node, str] = {}
    for node, reason in cls.requirements:
        first_reason.setdefault(node, reason)
    lines = [f"  - {describe_node(node)}: {reason}" for node, reason in list(first_reason.items())[:5]]
    if len(first_reason) > 5:
        lines.append(f"  - ... and {len(first_reason) - 5} more operations")
    paths = []
    for node in first_reason:
        path = node.target if node.op == "call_module" else node_scope(node)
        if path and path not in paths:
            paths.append(path)
    tensors = ", ".join(sorted({r.name for r in cls.refs})[:4])
    override = (f"exclude the module doing it (discover(model, x, exclude={paths[:3]!r})) so its inputs and outputs "
                "stay unpermuted" if paths else "exclude the module containing it (discover(..., exclude=[path]))")
    return (f"cannot prove that permuting group {name!r} ({cls.size} units; tensors {tensors}, ...) keeps the "
            f"function, because an operation touching it is not understood:\n" + "\n".join(lines) +
            f"\nOverride: {override}, or write the PermutationSpec by hand (PermutationSpec(groups=..., axes=...)).")


def _under(name: str, paths: Iterable[str]) -> bool:
    """Whether state_dict name ``name`` belongs to one of the module ``paths`` (or their submodules)."""
    return any(name.startswith(p + ".") for p in paths)


def refuse_groups_lost_to_ties(untied: Analysis, tied: Analysis, aliases: dict[str, str], exclude: tuple[str, ...],
                               modules: dict[str, nn.Module]) -> None:
    """Refuse where tying fixes groups that the names alone would permute (the tie links them to a fixed axis, or
    to blocks they do not fit): keeping the tie costs those groups, which must not pass unnoticed. Ties through an
    excluded module count as accepted: excluding it already keeps its tensors fixed."""
    sets = alias_sets(aliases)
    tied_classes = tied.axes.classes()
    untied_permutable = permutable_classes(untied)
    names = group_names(untied_permutable)
    lost: list[tuple[str, int, str, list[str]]] = []   # (group, units, why fixed, canonical names of its ties)
    for cls in untied_permutable:
        ref = cls.refs[0]
        owner = tied.axes.ref_owner.get((aliases.get(ref.name, ref.name), ref.dim, ref.block, ref.offset))
        tied_cls = tied_classes[tied.axes.find(owner)] if owner is not None else None
        if tied_cls is None or (tied_cls.fixed is None and units(tied_cls) > 1):
            continue
        tensors = {r.name for r in tied_cls.refs}
        involved = [c for c in sets if c in tensors] or list(sets)
        if all(any(_under(m, exclude) for m in sets[c]) for c in involved):
            continue
        why = tied_cls.fixed or (f"axes that move only in blocks of {tied_cls.granularity} entries (grouped "
                                 f"convolution or GroupNorm), which {tied_cls.size} entries do not split into")
        lost.append((names[cls.root], units(cls), why, involved))
    if not lost:
        return
    ties = sorted({c for *_, involved in lost for c in involved})
    suggested = sorted({m.rpartition(".")[0] for c in ties for m in sets[c][1:]} - {""} - set(exclude))
    suggested = [p for p in suggested if p in modules]
    groups = "; ".join(f"{g!r} ({n} units; linked to: {why})" for g, n, why, _ in lost)
    override = (f"exclude the modules using the other names (discover(model, x, exclude={suggested!r})), which then "
                "stay unpermuted with every group they touch" if suggested else
                "exclude the modules using the tied tensor (discover(..., exclude=[path]))")
    raise UnsupportedOperationError(
        f"tied tensors {', '.join(describe_tie(c, sets[c]) for c in ties)} are one tensor under several names; "
        f"keeping the tie forces groups that each name alone would permute to stay fixed: {groups}. Permuting the "
        "names separately would break the tie and change the function, so discover() refuses rather than drop "
        f"those groups silently.\nOverride: {override}; or untie the tensors (give each module its own copy); or "
        "write the PermutationSpec by hand (PermutationSpec(groups=..., axes=..., aliases=...)).")


def _refuse_overlapping_views(permutable: list[AxisClass], names: dict[int, str], aliases: dict[str, str],
                              overlaps: list[tuple[str, str]]) -> None:
    """Refuse to permute tensors whose memory overlaps another tensor's as a different view (a transpose or slice):
    their axes cannot be related by name, and permuting one would scramble the other."""
    overlapping = {aliases.get(n, n): pair for pair in overlaps for n in pair}
    for cls in permutable:
        hit = sorted({r.name for r in cls.refs} & set(overlapping))
        if hit:
            a, b = overlapping[hit[0]]
            paths = sorted({n.rpartition(".")[0] for n in (a, b)} - {""})
            raise UnsupportedOperationError(
                f"group {names[cls.root]!r} would permute {hit[0]!r}, but the memory of {a!r} and {b!r} overlaps as "
                "different views of one tensor (a transpose or slice of it): discover() cannot relate their axes, "
                "and permuting one would scramble the other.\nOverride: exclude the modules holding them "
                f"(discover(model, x, exclude={paths!r})), or give each its own copy (.clone()), or write the "
                "PermutationSpec by hand.")


def _check_disjoint_refs(permutable: list[AxisClass], names: dict[int, str], aliases: dict[str, str]) -> None:
    """Refuse where two groups would permute overlapping entries of one tensor axis."""
    spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for cls in permutable:
        for ref in cls.refs:
            spans.setdefault((ref.name, ref.dim), []).append(
                (ref.offset, ref.offset + cls.size * ref.block, names[cls.root]))  # size * block: entries
    for (tensor, dim), ranges in spans.items():
        ranges.sort()
        for (s0, e0, g0), (s1, e1, g1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                tied = alias_sets(aliases).get(tensor)
                what = f"the tied tensor {describe_tie(tensor, tied)}" if tied else repr(tensor)
                raise UnsupportedOperationError(
                    f"groups {g0!r} and {g1!r} both permute entries {s1}..{min(e0, e1) - 1} of {what} dim "
                    f"{dim}; the model ties axes in a way discover() cannot express. Exclude a module or write the "
                    "spec by hand.")
