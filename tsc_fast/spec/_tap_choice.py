"""Where each group's features are read (``Tap``), chosen from the places the analysis saw its units.

``"activation"``: after the producing layer's norm and activation, residual streams after their last add;
``"layer_output"``: the producing layer's raw output, residual streams at their first producer that is not a
projection shortcut. A tap is a module output or input where one carries the value, else an fx node.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ._analysis import Analysis
from ._axes import AxisClass
from ._ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    BATCHNORM_MODULES,
    MUTATING_FUNCTIONS,
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    PASSTHROUGH_MODULES,
)
from ._types import Tap

TAP_POINTS = ("activation", "layer_output")  # where features are read: see discover()

Candidate = tuple[fx.Node, int, int]   # (node, dim index, ndim): a node whose dim is one of the group's axes


def choose_tap(cls: AxisClass, candidates: list[Candidate], analysis: Analysis, gm: fx.GraphModule, tap_at: str,
               streams: set[int]) -> Tap | None:
    """Where a group's features are read (see ``discover``'s ``tap_at``). With ``"activation"``: a residual stream
    after its last residual add (then through a following activation), other groups at the producer's output
    followed through BN and the next activation. Falls back to the first place the units appear."""
    if not candidates:
        return None
    where = {node: (dim, ndim) for node, dim, ndim in reversed(candidates)}  # first dim per node
    order = analysis.order
    if tap_at == "layer_output":
        producer = _first_branch_producer(cls, where, analysis, streams)
        if producer is not None:
            dim, ndim = where[producer]
            return _tap_for_node(producer, -1 if dim == ndim - 1 else dim, gm, order)
    if cls.residual_scopes:
        last_add = max(order_ for order_, _ in cls.residual_scopes)
        start = next((node for node in where if order[node] == last_add), None)
        through_norm = False
    else:
        start = next((node for node, _, _ in candidates if node.op in ("call_module", "call_function") and
                      _produces(node, cls)), None)
        through_norm = True
    if start is None:
        start = min(where, key=lambda nd: order[nd])
    node = start
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user not in where or not _is_channelwise(user, gm, through_norm) or where[user] != where[node]:
            break
        node = user
        if _is_activation(node, gm):
            break
    dim, ndim = where[node]
    return _tap_for_node(node, -1 if dim == ndim - 1 else dim, gm, order)


def _is_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` applies an activation (module, function or method)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


def _is_channelwise(node: fx.Node, gm: fx.GraphModule, through_norm: bool) -> bool:
    """Ops a tap may walk through: activations, pass-through ops, and (for producer groups) per-channel norms."""
    if _is_activation(node, gm):
        return True
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, PASSTHROUGH_MODULES) or (through_norm and isinstance(module, BATCHNORM_MODULES))
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in PASSTHROUGH_METHODS


def _mutates(user: fx.Node, node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``user`` may modify ``node``'s tensor in place."""
    if user.kwargs.get("inplace"):
        return True
    if user.op == "call_module":
        return bool(getattr(gm.get_submodule(user.target), "inplace", False))
    if user.op == "call_method":
        return str(user.target).endswith("_") and user.args and user.args[0] is node
    return user.op == "call_function" and user.target in MUTATING_FUNCTIONS and bool(user.args) and \
        user.args[0] is node


def _first_branch_producer(cls: AxisClass, where: dict[fx.Node, tuple[int, int]], analysis: Analysis,
                           streams: set[int]) -> fx.Node | None:
    """The first layer in execution order that produces the group's units, skipping projection shortcuts (layers
    reading another residual stream: a stage's 1x1 downsampling conv) -- for a stream, its stem or the first
    residual branch's last layer."""
    producers = sorted((node for node in where if _produces(node, cls)), key=analysis.order.get)

    def reads_other_stream(node: fx.Node) -> bool:
        """Whether ``node`` reads a residual stream other than this class."""
        roots = {analysis.axes.find(a) for a in analysis.producer_inputs.get(node, [])}
        return any(r in streams and r != cls.root for r in roots)

    return next((n for n in producers if not reads_other_stream(n)), producers[0] if producers else None)


def _produces(node: fx.Node, cls: AxisClass) -> bool:
    """Whether ``node`` is a layer creating the class's units (a producing module, or an F.linear call)."""
    if node.op == "call_module":
        return node.target in cls.producers
    return node.op == "call_function" and node.target is F.linear


def _call_index(node: fx.Node, order: dict[fx.Node, int]) -> int:
    """Which call of its module ``node`` is within one forward pass (graph order is execution order)."""
    return sum(1 for other in order if other.op == "call_module" and other.target == node.target and
               order[other] < order[node])


def _tap_for_node(node: fx.Node, channel_axis: int, gm: fx.GraphModule, order: dict[fx.Node, int]) -> Tap:
    """A module-output tap where ``node`` is one; a module-input tap where a module reads it unchanged (no
    in-place user); else a node tap."""
    if node.op == "call_module":
        return Tap(node.target, "output", 0, _call_index(node, order), channel_axis, node.name)
    if not any(_mutates(user, node, gm) for user in node.users):
        for user in node.users:
            if user.op == "call_module" and node in user.args:
                return Tap(user.target, "input", list(user.args).index(node), _call_index(user, order), channel_axis,
                           node.name)
    return Tap("", "node", 0, 0, channel_axis, node.name)
