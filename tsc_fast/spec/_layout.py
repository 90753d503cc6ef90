"""Layouts: every dim of a traced tensor described as pieces of axes (see ``_axes``), and the pure rules that
carry layouts through reshapes, concatenations and pooling. Nothing here knows about operations or handlers.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ._axes import AxisUnion, Dim


class Layout(tuple):
    """The dims of one tensor (a tuple of Dim); its own type so that tuples of tensors are told apart."""


LayoutTree = Any   # what a node's layout may be: a Layout, None, or tuples / lists / dicts of them


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a tensor (a real one or a shape-only FakeTensor)."""
    return isinstance(value, torch.Tensor)


def join(path: str, name: str) -> str:
    """State_dict name of tensor ``name`` of the module at ``path`` ("" for the root)."""
    return f"{path}.{name}" if path else name


def fresh_dims(axes: AxisUnion, shape: Sequence[int], fixed: str | None = None) -> tuple[Dim, ...]:
    """One new plain axis per size in ``shape`` (fixed, with that reason, when ``fixed`` is given)."""
    return tuple(((axes.new(s, fixed), 1),) for s in shape)


def flatten_layouts(value: LayoutTree) -> list[Layout]:
    """Every Layout inside a nested value (tuples, lists, dicts), in order."""
    if value is None:
        return []
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, (tuple, list)):
        return [lay for v in value for lay in flatten_layouts(v)]
    if isinstance(value, dict):
        return [lay for v in value.values() for lay in flatten_layouts(v)]
    return []


def layout_matches(axes: AxisUnion, layout: LayoutTree, shape: Sequence[int]) -> bool:
    """Whether ``layout`` is a Layout describing a tensor of ``shape``."""
    return isinstance(layout, Layout) and len(layout) == len(shape) and all(
        axes.dim_size(dim) == size for dim, size in zip(layout, shape))


def tensor_operands(n: fx.Node, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, fx.Node]]:
    """(value, node) for every tensor argument of ``n`` given by a node, also inside list/tuple arguments."""
    found = []
    for value, node in zip(list(args) + list(kwargs.values()), list(n.args) + list(n.kwargs.values())):
        if is_tensor(value) and isinstance(node, fx.Node):
            found.append((value, node))
        elif isinstance(value, (list, tuple)) and isinstance(node, (list, tuple)):
            found.extend((v, nd) for v, nd in zip(value, node) if is_tensor(v) and isinstance(nd, fx.Node))
    return found


def spatial_rank(op_name: str, ndim: int) -> int:
    """Number of trailing (spatial) dims a pooling/resize op rewrites: from its name (``...2d``), else ndim - 2."""
    match = re.search(r"([123])d$", op_name.lower())
    return int(match.group(1)) if match else max(ndim - 2, 1)


def spatial_layout(axes: AxisUnion, x: Layout, out_shape: Sequence[int], op_name: str) -> tuple[Dim, ...]:
    """Pooling/resizing: leading (batch, channel) axes kept, the spatial ones replaced by new fixed axes."""
    keep = len(x) - spatial_rank(op_name, len(x))
    return x[:keep] + fresh_dims(axes, out_shape[keep:], "spatial axis")


def coarsen_to_groups(axes: AxisUnion, n: fx.Node, channel: Dim, num_groups: int) -> None:
    """GroupNorm with ``num_groups`` groups: channels may move between groups only as whole groups."""
    channels = axes.dim_size(channel)
    if num_groups not in (1, channels):
        axes.coarsen_dim(channel, channels // num_groups, n, f"GroupNorm with {num_groups} groups")


def simplify(axes: AxisUnion, dim: Dim, reason: str) -> Dim:
    """A dim whose pieces can carry no permutation becomes one plain fixed axis (keeps later links simple)."""
    if len(dim) == 1 and dim[0][1] == 1:
        return dim
    if axes.dim_is_inert(dim):
        return ((axes.new(axes.dim_size(dim), reason), 1),)
    return dim


def reshape_layout(axes: AxisUnion, n: fx.Node, x: Layout, out_shape: tuple[int, ...]) -> tuple[Dim, ...]:
    """Layout after view/reshape/flatten/squeeze: match runs of input and output dims with equal products."""
    in_shape = tuple(axes.dim_size(d) for d in x)
    out: list = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            out.append(((axes.new(1, "unit axis"), 1),))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            raise AssertionError("internal: reshape sizes do not match")
        ii, jj = [i], [j]
        p_in, p_out = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                p_in *= in_shape[i]
                ii.append(i)
                i += 1
            else:
                p_out *= out_shape[j]
                jj.append(j)
                j += 1
        ii = [k for k in ii if in_shape[k] != 1]
        out.extend(_reshape_run(axes, n, [x[k] for k in ii], [out_shape[k] for k in jj]))
    return tuple(out)


def _reshape_run(axes: AxisUnion, n: fx.Node, in_dims: list[Dim], out_sizes: list[int]) -> list[Dim]:
    """One run of input dims becoming output dims of the same total size: kept, merged, unmerged, or refused."""
    if len(in_dims) == 1 and len(out_sizes) == 1:
        return [in_dims[0]]
    if len(out_sizes) == 1:
        # merge (flatten): the leading dim's units own blocks of the trailing dims' size; trailing dims must be fixed
        inner = 1
        for dim in in_dims[1:]:
            inner *= axes.dim_size(dim)
            axes.require_dim(dim, n, "flattened behind another axis (only the leading flattened axis can be "
                                     "permuted, e.g. channels of an (N, C, H, W) map)")
        merged = tuple((a, block * inner) for a, block in in_dims[0])
        return [simplify(axes, merged, "flattened axis")]
    if len(in_dims) == 1 and len(in_dims[0]) == 1:
        (a, block), = in_dims[0]
        tail = 1
        for size in out_sizes[1:]:
            tail *= size
        if axes.size[a] == out_sizes[0] and block == tail:  # unflatten of an earlier flatten: units come back whole
            return [((a, 1),)] + [((axes.new(s, "unflattened axis"), 1),) for s in out_sizes[1:]]
    for dim in in_dims:
        if not axes.dim_is_inert(dim):
            axes.require_dim(dim, n, "a reshape splits or regroups this axis (a split into attention heads is "
                                     "understood inside nn.MultiheadAttention and qkv-Linear attention blocks: "
                                     "attributes qkv and proj (nn.Linear) and num_heads, no other parameters)")
    return [((axes.new(s, "reshaped axis"), 1),) for s in out_sizes]
