"""Handlers of attention modules: nn.MultiheadAttention (by type) and verified qkv-Linear attention blocks (by
structure, see ``_attention``). Both see the whole call; their groups are head-structured (``Analysis.heads``).
"""
from __future__ import annotations

import torch.nn as nn

from ._analysis import Analysis, ModuleCall, ModuleTable
from ._attention import qkv_attention_heads
from ._layout import Layout, LayoutTree, is_tensor, join
from ._tracing import describe_node
from ._types import AxisRef

ATTENTION_MODULES = ModuleTable()


@ATTENTION_MODULES.register(nn.MultiheadAttention, whole_call=True)
def multihead_attention(an: Analysis, call: ModuleCall) -> LayoutTree:
    """nn.MultiheadAttention: projection rows form a query/key and a value/output group; out_proj a new axis."""
    # both groups are head-structured: heads move whole, and the same way in both
    n, module, path, result = call.node, call.module, call.path, call.result
    names = ("query", "key", "value")
    nodes = dict(zip(names, n.args))
    nodes.update({k: v for k, v in n.kwargs.items() if k in names})
    layouts = [an.layouts.get(nodes.get(k)) for k in names]
    if not all(isinstance(lay, Layout) for lay in layouts) or not isinstance(result, tuple):
        return an.opaque(n, "MultiheadAttention called with unexpected arguments", result)
    query, key, value = layouts
    embed = module.embed_dim
    qk, vo, out = an.axes.new(embed), an.axes.new(embed), an.axes.new(embed)
    attach = an.axes.attach
    if module._qkv_same_embed_dim:
        weight = join(path, "in_proj_weight")
        for layout in layouts:
            an.axes.attach_dim(layout[-1], weight, 1)
        attach(qk, AxisRef(weight, 0, 1, 0))
        attach(qk, AxisRef(weight, 0, 1, embed))
        attach(vo, AxisRef(weight, 0, 1, 2 * embed))
    else:
        for layout, proj, axis in zip(layouts, ("q", "k", "v"), (qk, qk, vo)):
            an.axes.attach_dim(layout[-1], join(path, f"{proj}_proj_weight"), 1)
            attach(axis, AxisRef(join(path, f"{proj}_proj_weight"), 0))
    if module.in_proj_bias is not None:
        bias = join(path, "in_proj_bias")
        attach(qk, AxisRef(bias, 0, 1, 0))
        attach(qk, AxisRef(bias, 0, 1, embed))
        attach(vo, AxisRef(bias, 0, 1, 2 * embed))
    if module.bias_k is not None:
        attach(qk, AxisRef(join(path, "bias_k"), 2))
        attach(vo, AxisRef(join(path, "bias_v"), 2))
    attach(vo, AxisRef(join(path, "out_proj.weight"), 1))
    attach(out, AxisRef(join(path, "out_proj.weight"), 0))
    if module.out_proj.bias is not None:
        attach(out, AxisRef(join(path, "out_proj.bias"), 0))
    an.axes.produce(qk, join(path, "qk"))
    an.axes.produce(vo, join(path, "vo"))
    an.axes.produce(out, join(path, "out_proj"))
    # keys and values are attended over together: their token axes may only move together
    for dk, dv in zip(key[:-1], value[:-1]):
        an.axes.union_dims(dk, dv, n, describe_node(n))
    an.heads[path] = (module.num_heads, qk, vo)
    for axis in (qk, vo):
        an.axes.see(axis, an.order[n])
    attn_output = Layout(query[:-1] + (((out, 1),),))
    weights = an.fixed_like(result[1], "attention weights") if is_tensor(result[1]) else None
    return (attn_output, weights)


def is_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a verified qkv-Linear attention block (see ``_attention``)."""
    return qkv_attention_heads(module) is not None


@ATTENTION_MODULES.recognise(is_qkv_attention)
def qkv_attention(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Verified qkv-Linear attention block: ``qkv`` rows form a query/key and a value group; ``proj`` a new axis."""
    # queries at offset 0 of qkv's rows, keys at E (one group), values at 2E with proj's input columns (the other);
    # both head-structured, as in nn.MultiheadAttention
    n, module, path, result = call.node, call.module, call.path, call.result
    num_heads = qkv_attention_heads(module)
    x = an.layouts.get(n.args[0]) if len(n.args) == 1 and not n.kwargs else None
    embed = module.proj.in_features
    if not isinstance(x, Layout) or not is_tensor(result) or result.shape[-1] != module.proj.out_features or \
            len(result.shape) != len(x):
        return an.opaque(n, "qkv attention called with unexpected arguments", result)
    qk, vo, out = an.axes.new(embed), an.axes.new(embed), an.axes.new(module.proj.out_features)
    attach = an.axes.attach
    an.axes.attach_dim(x[-1], join(path, "qkv.weight"), 1)
    for name in ("qkv.weight", "qkv.bias"):
        if join(path, name) in an.state_keys:
            attach(qk, AxisRef(join(path, name), 0, 1, 0))
            attach(qk, AxisRef(join(path, name), 0, 1, embed))
            attach(vo, AxisRef(join(path, name), 0, 1, 2 * embed))
    attach(vo, AxisRef(join(path, "proj.weight"), 1))
    attach(out, AxisRef(join(path, "proj.weight"), 0))
    if join(path, "proj.bias") in an.state_keys:
        attach(out, AxisRef(join(path, "proj.bias"), 0))
    an.axes.produce(qk, join(path, "qk"))
    an.axes.produce(vo, join(path, "vo"))
    an.axes.produce(out, join(path, "proj"))
    an.heads[path] = (num_heads, qk, vo)
    for axis in (qk, vo):
        an.axes.see(axis, an.order[n])
    return Layout(x[:-1] + (((out, 1),),))
