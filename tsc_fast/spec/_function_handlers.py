"""Handlers of function calls (by function) and tensor method calls (by method name): elementwise ops, residual
adds, products, reshapes, reductions, pooling, permutes, matmul, F.linear, functional norms, concatenation,
expand and indexing.

Each handler gets the call (``call.x``: its first argument's layout) and returns the output's layout. Unless
registered otherwise, it is called only when some argument has a layout and the result is a tensor (see
``CallEntry``); a function or method without a handler is opaque.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ._analysis import Analysis, Call, CallTable
from ._axes import Dim
from ._layout import (
    Layout,
    LayoutTree,
    coarsen_to_groups,
    is_tensor,
    reshape_layout,
    simplify,
    spatial_layout,
    tensor_operands,
)
from ._ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ADD_FUNCTIONS,
    ADD_METHODS,
    CONCAT_FUNCTIONS,
    EXPAND_METHODS,
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    NO_EFFECT_FUNCTIONS,
    NORM_FUNCTIONS,
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    POOL_FUNCTIONS,
    PRODUCT_FUNCTIONS,
    PRODUCT_METHODS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SHAPE_QUERY_METHODS,
    is_stochastic_depth,
)
from ._tracing import describe_node, node_scope

FUNCTIONS = CallTable("function")
METHODS = CallTable("method")


# --- elementwise ----------------------------------------------------------------------------------------------
@FUNCTIONS.register(*ACTIVATION_FUNCTIONS, *PASSTHROUGH_FUNCTIONS)
@METHODS.register(*ACTIVATION_METHODS, *PASSTHROUGH_METHODS)
def elementwise_unary(an: Analysis, call: Call) -> LayoutTree:
    """Activations and other one-tensor elementwise ops: every axis kept."""
    tensors = tensor_operands(call.node, call.args, call.kwargs)
    if is_tensor(call.first) and call.first.shape == call.result.shape and len(tensors) == 1:
        return call.x
    return an.opaque(call.node, "elementwise op with unexpected arguments", call.result)


@FUNCTIONS.register(*ADD_FUNCTIONS)
@METHODS.register(*ADD_METHODS)
def residual_add(an: Analysis, call: Call) -> LayoutTree:
    """Add / sub: operands' axes linked (with broadcasting); linked axes are recorded as a residual stream."""
    return broadcast(an, call, residual=True)


@FUNCTIONS.register(*PRODUCT_FUNCTIONS)
@METHODS.register(*PRODUCT_METHODS)
def product(an: Analysis, call: Call) -> LayoutTree:
    """Mul / div / maximum / minimum: operands' axes linked with broadcasting (squeeze-excitation, layer scale)."""
    return broadcast(an, call, residual=False)


def broadcast(an: Analysis, call: Call, residual: bool) -> LayoutTree:
    """Broadcasting elementwise op: equal-sized trailing dims are linked; size-1 dims broadcast."""
    n, result = call.node, call.result
    operands = [(a, an.layouts[node]) for a, node in tensor_operands(n, call.args, call.kwargs)
                if isinstance(an.layouts.get(node), Layout)]
    if not operands:
        return an.fixed_like(result, "constant")
    ndim = result.dim()
    out: list[Dim | None] = [None] * ndim
    for value, layout in operands:
        for i in range(1, value.dim() + 1):
            dim = layout[-i]
            if value.shape[-i] == 1 and result.shape[-i] != 1:
                continue
            current = out[ndim - i]
            if current is None:
                out[ndim - i] = dim
            elif current != dim:
                an.axes.union_dims(current, dim, n, describe_node(n))
                if residual:
                    for a, _ in dim:
                        an.axes.residual_add(a, an.order[n], node_scope(n))
    for i in range(ndim):
        if out[i] is None:
            out[i] = an.fresh_dim(result.shape[i], "broadcast axis")
    return tuple(out)


@FUNCTIONS.recognise(is_stochastic_depth)
def stochastic_depth(an: Analysis, call: Call) -> LayoutTree:
    """torchvision's stochastic depth: identity in eval; in training a per-sample scale, the same for every unit."""
    return call.x


# --- shapes ---------------------------------------------------------------------------------------------------
@FUNCTIONS.register(*NO_EFFECT_FUNCTIONS, tensor_result=False)
@METHODS.register(*SHAPE_QUERY_METHODS, tensor_result=False)
def shape_query(an: Analysis, call: Call) -> LayoutTree:
    """Shape queries and asserts: no link; a tensor they return is a new fixed one."""
    return an.fixed_like(call.result, "shape query") if is_tensor(call.result) else None


@FUNCTIONS.register(*RESHAPE_FUNCTIONS)
@METHODS.register(*RESHAPE_METHODS)
def reshape(an: Analysis, call: Call) -> LayoutTree:
    """view / reshape / flatten / squeeze / unsqueeze: runs of dims matched by size (see ``reshape_layout``)."""
    return reshape_layout(an.axes, call.node, call.x, tuple(call.result.shape))


@FUNCTIONS.register(torch.permute)
@METHODS.register("permute")
def permute(an: Analysis, call: Call) -> LayoutTree:
    """permute: the input's dims in the new order."""
    n, x, args = call.node, call.x, call.args
    ndim = call.first.dim()
    order = args[1:] if n.op == "call_method" else args[1]
    if n.op == "call_method" and len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = order[0]
    order = call.kwargs.get("dims", order)
    return tuple(x[d % ndim] for d in order)


@FUNCTIONS.register(torch.transpose)
@METHODS.register("transpose", "t")
def transpose(an: Analysis, call: Call) -> LayoutTree:
    """transpose / t: two dims swapped."""
    ndim = call.first.dim()
    if call.node.target == "t":
        d0, d1 = 0, ndim - 1
    else:
        d0, d1 = call.args[1] % ndim, call.args[2] % ndim
    out = list(call.x)
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out)


@METHODS.register(*EXPAND_METHODS)
def expand(an: Analysis, call: Call) -> LayoutTree:
    """expand / expand_as: size-1 dims broadcast to new fixed axes, new leading dims too."""
    first, result = call.first, call.result
    lead = result.dim() - first.dim()
    out = list(an.fresh(result.shape[:lead], "broadcast axis"))
    for i, dim in enumerate(call.x):
        if first.shape[i] == 1 and result.shape[lead + i] != 1:
            out.append(an.fresh_dim(result.shape[lead + i], "broadcast axis"))
        else:
            out.append(dim)
    return tuple(out)


@FUNCTIONS.register(*CONCAT_FUNCTIONS)
def concatenate(an: Analysis, call: Call) -> LayoutTree:
    """cat: the other dims linked; the concatenated dim made of the inputs' pieces, one after another."""
    n, result = call.node, call.result
    tensor_nodes = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else 0) % result.dim()
    layouts = [an.layouts.get(t) for t in tensor_nodes]
    if not all(isinstance(lay, Layout) and len(lay) == result.dim() for lay in layouts):
        return an.opaque(n, "concatenation of tensors of different ranks", result)
    out = list(layouts[0])
    for lay in layouts[1:]:
        for i in range(result.dim()):
            if i != dim:
                an.axes.union_dims(out[i], lay[i], n, describe_node(n))
    out[dim] = simplify(an.axes, tuple(piece for lay in layouts for piece in lay[dim]), "concatenated axis")
    return tuple(out)


@FUNCTIONS.register(operator.getitem, needs_input_layout=False, tensor_result=False)
def getitem(an: Analysis, call: Call) -> LayoutTree:
    """Indexing: an item of a tuple keeps its layout; a tensor index keeps whole axes and pins sliced ones."""
    container, layout, index, result = call.first, call.x, call.args[1], call.result
    if not is_tensor(container):
        if isinstance(layout, (tuple, list)) and isinstance(index, int) and is_tensor(result):
            item = layout[index]
            return item if isinstance(item, Layout) else an.fixed_like(result, "item")
        return an.fixed_like(result, "item") if is_tensor(result) else None
    return index_layout(an, call.node, container, layout, index, result)


def index_layout(an: Analysis, n: fx.Node, value: torch.Tensor, layout: Layout, index: Any, result: torch.Tensor
                 ) -> LayoutTree:
    """Layout of ``value[index]`` for basic indexing (ints, slices, None, Ellipsis); tensor or list indices are
    opaque, ints and partial slices pin their axis."""
    index = index if isinstance(index, tuple) else (index,)
    if any(is_tensor(i) or isinstance(i, (list, fx.Node)) for i in index):
        return an.opaque(n, "indexing with tensors or lists is not supported", result)
    n_explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (value.dim() - n_explicit))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (value.dim() - sum(1 for i in expanded if i is not None)))
    out, d = [], 0
    for i in expanded:
        if i is None:
            out.append(an.fresh_dim(1, "new axis"))
            continue
        dim, size = layout[d], value.shape[d]
        d += 1
        if isinstance(i, int):
            an.axes.require_dim(dim, n, "indexing picks single units of this axis")
        elif isinstance(i, slice) and range(*i.indices(size)) == range(size):
            out.append(dim)
        else:
            an.axes.require_dim(dim, n, "slicing keeps only some units of this axis")
            out.append(an.fresh_dim(len(range(*i.indices(size))), "sliced axis"))
    return tuple(out)


# --- reductions and pooling -----------------------------------------------------------------------------------
@FUNCTIONS.register(*REDUCE_FUNCTIONS)
@METHODS.register(*REDUCE_METHODS)
def reduce(an: Analysis, call: Call) -> LayoutTree:
    """mean / sum / amax / amin / logsumexp: reduced axes dropped (size 1 with keepdim), no constraint on them."""
    args, kwargs, first = call.args, call.kwargs, call.first
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    if dims is None or dims == ():
        reduced = set(range(first.dim()))
    else:
        reduced = {d % first.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
    out = []
    for i, dim in enumerate(call.x):
        if i not in reduced:
            out.append(dim)
        elif keepdim:
            out.append(an.fresh_dim(1, "reduced axis"))
    # sums and means over units are unchanged by permuting them, so reduced axes need no constraint
    return tuple(out)


@FUNCTIONS.register(*POOL_FUNCTIONS)
def pool(an: Analysis, call: Call) -> LayoutTree:
    """Functional pooling and interpolation: batch and channel axes kept, spatial ones new and fixed."""
    target, args = call.node.target, call.args
    if call.kwargs.get("return_indices") or (target in (F.max_pool2d,) and len(args) > 6 and args[6]):
        return an.opaque(call.node, "pooling that returns indices is not supported", call.result)
    return spatial_layout(an.axes, call.x, call.result.shape, target.__name__)


# --- contractions and norms -----------------------------------------------------------------------------------
@FUNCTIONS.register(*MATMUL_FUNCTIONS)
@METHODS.register(*MATMUL_METHODS)
def matmul(an: Analysis, call: Call) -> LayoutTree:
    """matmul / bmm / @: the contracted axes linked, batch dims broadcast, the outer ones kept."""
    n, result = call.node, call.result
    (a, b), (la, lb) = call.args[:2], (an.layouts.get(n.args[0]), an.layouts.get(n.args[1]))
    if not (is_tensor(a) and is_tensor(b) and isinstance(la, Layout) and isinstance(lb, Layout)):
        return an.opaque(n, "matmul with unexpected arguments", result)
    if a.dim() < 2 or b.dim() < 2:
        return an.opaque(n, "matmul of 1-D tensors is not supported", result)
    an.axes.union_dims(la[-1], lb[-2], n, describe_node(n))  # contracted axis: permute both alike
    batch = _broadcast_batch(an, n, la[:-2], lb[:-2], a.shape[:-2], b.shape[:-2], result.shape[:-2])
    return batch + (la[-2], lb[-1])


def _broadcast_batch(an: Analysis, n: fx.Node, la: tuple[Dim, ...], lb: tuple[Dim, ...], sa: Sequence[int],
                     sb: Sequence[int], sout: Sequence[int]) -> tuple[Dim, ...]:
    """The batch dims of a matmul: linked where both operands have them, broadcast where one has size 1."""
    out = []
    for i in range(1, len(sout) + 1):
        da = la[-i] if i <= len(la) and sa[-i] != 1 else None
        db = lb[-i] if i <= len(lb) and sb[-i] != 1 else None
        if da is not None and db is not None:
            an.axes.union_dims(da, db, n, describe_node(n))
        out.append(da or db or an.fresh_dim(sout[-i], "broadcast axis"))
    return tuple(reversed(out))


@FUNCTIONS.register(F.linear)
def functional_linear(an: Analysis, call: Call) -> LayoutTree:
    """F.linear: the input's last axis linked to the weight's columns; the output takes the weight's rows."""
    n, result = call.node, call.result
    weight_node = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    bias_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    x, w = an.layouts.get(n.args[0]), an.layouts.get(weight_node)
    if not isinstance(x, Layout) or not isinstance(w, Layout) or len(w) != 2:
        return an.opaque(n, "F.linear with unexpected arguments", result)
    an.axes.union_dims(x[-1], w[1], n, describe_node(n))
    if isinstance(bias_node, fx.Node) and isinstance(an.layouts.get(bias_node), Layout):
        an.axes.union_dims(an.layouts[bias_node][0], w[0], n, describe_node(n))
    if weight_node.op == "get_attr":
        an.axes.produce(w[0][0][0], weight_node.target.rpartition(".")[0])
    return x[:-1] + (w[0],)


_NORM_ARGUMENTS = {F.layer_norm: ("input", "normalized_shape", "weight", "bias"),
                   F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias"),
                   F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias"),
                   F.group_norm: ("input", "num_groups", "weight", "bias")}


@FUNCTIONS.register(*NORM_FUNCTIONS)
def functional_norm(an: Analysis, call: Call) -> LayoutTree:
    """F.layer_norm: weight/bias follow the normalised trailing dims; the others: per-channel tensors (dim 1)."""
    n, x, result = call.node, call.x, call.result
    names = _NORM_ARGUMENTS[n.target]
    bound = dict(zip(names, n.args))
    bound.update({k: v for k, v in n.kwargs.items() if k in names})
    if n.target is F.layer_norm:
        k = len(bound["normalized_shape"]) if not isinstance(bound["normalized_shape"], int) else 1
        targets = x[len(x) - k:]
    else:
        targets = (x[1],)
        if n.target is F.group_norm:
            coarsen_to_groups(an.axes, n, x[1], bound["num_groups"])
    for name in names[1:]:
        tensor = bound.get(name)
        if isinstance(tensor, fx.Node) and isinstance(an.layouts.get(tensor), Layout):
            layout = an.layouts[tensor]
            if len(layout) != len(targets):
                return an.opaque(n, f"{name} of unexpected shape", result)
            for a, b in zip(layout, targets):
                an.axes.union_dims(a, b, n, describe_node(n))
    return x
