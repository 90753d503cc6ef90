"""Streaming feature taps: call a callback with every group's features during an ordinary forward pass.

Module taps are forward hooks / forward pre-hooks registered on the model's own submodules (found by path, so one
spec serves every model of the architecture). Only taps on values that cross no module boundary need the traced
graph: those models run as a GraphModule (sharing the model's modules and parameters) with tap calls inserted.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ._attention import qkv_attention_heads
from ._tracing import trace
from ._types import PermutationSpec

TapCallback = Callable[[str, torch.Tensor, int], None]

_ACTIVE_NODE_TAPS: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("tsc_fast_node_taps",
                                                                                   default=None)


def _emit_node_tap(key: str, value: torch.Tensor) -> torch.Tensor:
    emit = _ACTIVE_NODE_TAPS.get()
    if emit is not None:
        emit(key, value)
    return value


fx.wrap("_emit_node_tap")

_TAPPED_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _tapped_graph_module(model: nn.Module, spec: PermutationSpec) -> fx.GraphModule:
    """A GraphModule of ``model`` that reports the values of the spec's node taps (cached per model and spec)."""
    node_names = tuple(sorted({t.node for t in spec.taps.values() if t.kind == "node"}))
    cache = _TAPPED_GRAPHS.setdefault(model, {})
    key = (spec.exclude, node_names)
    if key not in cache:
        gm = trace(model, spec.exclude)
        nodes = {n.name: n for n in gm.graph.nodes}
        missing = [name for name in node_names if name not in nodes]
        if missing:
            raise ValueError(f"spec taps read fx nodes {missing} that the traced {type(model).__name__} does not "
                             "have; the spec was discovered on a different architecture")
        for name in node_names:
            node = nodes[name]
            with gm.graph.inserting_after(node):
                gm.graph.call_function(_emit_node_tap, (name, node))
        gm.recompile()
        cache[key] = gm
    return cache[key]


@contextlib.contextmanager
def attached_taps(model: nn.Module, spec: PermutationSpec, callback: TapCallback):
    """Register the spec's taps on ``model`` while the context is open; yields the callable to run batches with.

    Inside the context, ``run(x)`` runs one forward pass of ``model`` and calls ``callback(group, features,
    channel_axis)`` once per group with detached features, at the moment they are computed. Use it to stream
    statistics over many batches with a single registration.
    """
    by_module: dict[str, list[tuple[str, object]]] = {}
    node_taps: dict[str, list[tuple[str, int]]] = {}
    attention: dict[str, list[tuple[str, str]]] = {}
    for group, tap in spec.taps.items():
        if tap.kind in ("attn_qk", "attn_v"):
            attention.setdefault(tap.module, []).append((group, tap.kind))
        elif tap.kind == "node":
            node_taps.setdefault(tap.node, []).append((group, tap.channel_axis))
        else:
            by_module.setdefault(tap.module, []).append((group, tap))
    calls: dict[str, int] = {}
    handles = []

    def make_hook(path: str, kind: str):
        entries = [(g, t) for g, t in by_module[path] if t.kind == kind]

        def emit(count: int, value_of):
            for group, tap in entries:
                if tap.call == count:
                    callback(group, value_of(tap).detach(), tap.channel_axis)

        if kind == "input":
            def pre_hook(module, args):
                count = calls.get(path + "<", 0)
                calls[path + "<"] = count + 1
                emit(count, lambda tap: args[tap.index])
            return pre_hook

        def hook(module, args, output):
            count = calls.get(path + ">", 0)
            calls[path + ">"] = count + 1
            emit(count, lambda tap: output)
        return hook

    try:
        for path, entries in by_module.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"spec taps module {path!r}, which {type(model).__name__} does not have; the spec "
                                 "was discovered on a different architecture") from None
            kinds = {t.kind for _, t in entries}
            if "input" in kinds:
                handles.append(module.register_forward_pre_hook(make_hook(path, "input")))
            if "output" in kinds:
                handles.append(module.register_forward_hook(make_hook(path, "output")))
        for path, entries in attention.items():
            module = model.get_submodule(path)
            if isinstance(module, nn.MultiheadAttention):
                handles.append(module.register_forward_pre_hook(_attention_hook(entries, callback),
                                                                with_kwargs=True))
            elif qkv_attention_heads(module) is not None:
                handles.append(module.qkv.register_forward_hook(_qkv_hook(entries, callback)))
            else:
                raise ValueError(f"spec reads attention projections of {path!r}, which is a "
                                 f"{type(module).__name__}, neither nn.MultiheadAttention nor a qkv-Linear "
                                 "attention block")
        runner: Callable = _tapped_graph_module(model, spec) if node_taps else model

        def emit_node(name: str, value: torch.Tensor):
            for group, channel_axis in node_taps[name]:
                callback(group, value.detach(), channel_axis)

        def run(x):
            calls.clear()
            token = _ACTIVE_NODE_TAPS.set(emit_node) if node_taps else None
            try:
                return runner(*x) if isinstance(x, tuple) else runner(x)
            finally:
                if token is not None:
                    _ACTIVE_NODE_TAPS.reset(token)

        yield run
    finally:
        for handle in handles:
            handle.remove()


def _attention_hook(entries: list[tuple[str, str]], callback: TapCallback):
    """Pre-hook of nn.MultiheadAttention: recompute its query/key/value projections and report them."""
    def hook(module: nn.MultiheadAttention, args, kwargs):
        named = dict(zip(("query", "key", "value"), args))
        named.update({k: v for k, v in kwargs.items() if k in ("query", "key", "value")})
        query, key, value = (named[k].detach() for k in ("query", "key", "value"))
        q, k, v = _projections(module, query, key, value)
        token_axis = 1 if module.batch_first and query.dim() == 3 else 0
        for group, kind in entries:
            if kind == "attn_qk":
                callback(group, torch.cat([q, k], dim=token_axis), -1)
            else:
                callback(group, v, -1)
    return hook


def _qkv_hook(entries: list[tuple[str, str]], callback: TapCallback):
    """Forward hook of a qkv-Linear attention block's ``qkv`` Linear: its (..., tokens, 3E) output holds the
    query, key and value projections side by side."""
    def hook(linear: nn.Linear, args, output: torch.Tensor):
        embed = output.shape[-1] // 3
        output = output.detach()
        for group, kind in entries:
            if kind == "attn_qk":  # queries and keys share units: their tokens are samples of the same units
                callback(group, torch.cat([output[..., :embed], output[..., embed:2 * embed]], dim=-2), -1)
            else:
                callback(group, output[..., 2 * embed:], -1)
    return hook


def _projections(module: nn.MultiheadAttention, query, key, value):
    embed = module.embed_dim
    bias = module.in_proj_bias
    biases = (None, None, None) if bias is None else (bias[:embed], bias[embed:2 * embed], bias[2 * embed:])
    if module._qkv_same_embed_dim:
        weight = module.in_proj_weight
        weights = (weight[:embed], weight[embed:2 * embed], weight[2 * embed:])
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    with torch.no_grad():
        return tuple(torch.nn.functional.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))


def forward_with_taps(model: nn.Module, spec: PermutationSpec, x, callback: TapCallback):
    """Run ``model`` on ``x`` and call ``callback(group, features, channel_axis)`` once per group, during the
    forward pass (streaming: features are passed on as soon as they exist, before later in-place ops).

    Features are detached: for a conv/linear group the post-activation tensor if an activation follows (else the
    producer's or its BN's output); for a residual stream the stream after its last residual add (after the
    activation applied to it, if one follows directly). ``channel_axis`` is 1 for (N, C, H, W) maps and -1 for
    (N, C) or (N, L, C). Gradients are tracked as the caller's context says (wrap in torch.no_grad() for stats).
    Returns the model's output. Raises RuntimeError if some group was not reported exactly once.
    """
    seen: dict[str, int] = {}

    def counting(group, features, channel_axis):
        seen[group] = seen.get(group, 0) + 1
        callback(group, features, channel_axis)

    with attached_taps(model, spec, counting) as run:
        output = run(x)
    wrong = {g: seen.get(g, 0) for g in spec.taps if seen.get(g, 0) != 1}
    if wrong:
        raise RuntimeError(f"feature taps fired {wrong} times (expected once each); the model does not match the "
                           "spec's architecture")
    return output
