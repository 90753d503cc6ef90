"""discover(): trace a model with torch.fx, link tensor axes per operation, and read off the permutation groups.

The pipeline, one module per step:

- tracing (``_tracing``): torch.fx traces the model, excluded modules and verified attention blocks kept whole;
- analysis (``_analysis``): the traced graph is run once on the example input (eval mode, no grad, shape-only
  tensors where possible) by an fx Interpreter that, node by node, describes every output dimension as pieces of
  axes (``_layout``, ``_axes``) and links the axes each operation ties together. What an operation ties is said
  by its handler, registered in a table per module type, per function and per tensor method (``_handlers``:
  ``_module_handlers``, ``_function_handlers``, ``_attention_handlers``). Operations without a handler mark the
  axes they touch as "must stay fixed";
- spec building (``_build``, ``_tap_choice``): the classes of linked axes become groups, their tensor axes, heads
  and taps -- or, where an axis that must stay fixed would otherwise be permuted, a refusal naming the operation
  and the override.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..module_tools import eval_mode
from ._analysis import Analysis
from ._build import build_spec, refuse_groups_lost_to_ties
from ._handlers import HANDLERS
from ._layout import is_tensor
from ._tap_choice import TAP_POINTS
from ._ties import overlapping_views, tensor_aliases
from ._tracing import trace
from ._types import PermutationSpec


def discover(model: nn.Module, example_input: Any, exclude: Iterable[str] = (), tap_at: str = "activation"
             ) -> PermutationSpec:
    """Find the permutation groups of ``model`` by tracing it with torch.fx and running it once on ``example_input``.

    Supported: Conv (groups=1, depthwise, and grouped with at least as many outputs as inputs: the channel groups
    then move as whole blocks), Linear, BatchNorm/InstanceNorm, LayerNorm over trailing dims (channels-last too),
    GroupNorm (with 1 < G < C groups its groups move as whole blocks), activations (modules, functions, methods,
    in-place), dropout, identity, residual add/sub, products with broadcasting (squeeze-excitation, layer scale),
    pooling, flatten/view/reshape (into Linear: channel blocks), permute/transpose, matmul, F.linear,
    concatenation, reductions, Embedding, nn.MultiheadAttention and qkv-Linear attention blocks (head-aware groups,
    ``spec.heads``; see ``_attention`` for what qualifies). Units that move as blocks of channels have
    ``spec.taps[g].unit_channels > 1``. The model input axes and all output axes stay fixed. ``exclude``: module
    paths treated as opaque blocks (not traced into; their parameters and the axes of their inputs and outputs stay
    unpermuted) -- the override for modules discovery refuses or cannot trace. The model's train/eval mode is
    restored afterwards; the example input only sets shapes.

    Tied tensors (one Parameter or buffer under several state_dict names: ``head.weight = embed.weight``, a buffer
    registered in two modules) are permuted as one tensor: the axes of all its names are linked, ``spec.axes``
    names it by its first name and ``spec.aliases`` maps the others to that name. Where keeping a tie forces groups
    that the names alone would permute to stay fixed (it links them to the model input, say), discovery refuses
    and names the tie and the modules to exclude; tensors whose memory overlaps as different views (a transpose)
    are refused where permuted. An excluded module's own tensors stay fixed wherever they are used.

    ``tap_at``: where each group's features are read for the correlation statistics (see ``TAP_POINTS``).
    ``"activation"``: after the producing layer's norm and activation, residual streams after their last add.
    ``"layer_output"``: the producing layer's raw output (before norm and activation), residual streams at their
    first producer that is not a projection shortcut (the stem conv, then each stage's first residual branch) --
    where the official TSC code reads its PreAct-ResNet-18 and ResNet-18 features.
    Raises UntraceableModelError / UnsupportedOperationError (both ValueError) with the override to use.
    """
    if tap_at not in TAP_POINTS:
        raise ValueError(f"tap_at must be one of {TAP_POINTS}, got {tap_at!r}")
    exclude = tuple(exclude)
    known = dict(model.named_modules())
    unknown = [p for p in exclude if p not in known or p == ""]
    if unknown:
        raise ValueError(f"exclude names modules that do not exist: {unknown} (use paths from model.named_modules())")
    gm = trace(model, exclude)
    state = model.state_dict(keep_vars=True)  # keep_vars: a shared Parameter is the same object under each name
    shapes = {name: tuple(t.shape) for name, t in state.items() if is_tensor(t)}
    aliases = tensor_aliases(state)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    analysis = _analyze(model, gm, shapes, exclude, inputs, aliases)
    if aliases:  # what the names would allow untied tells which groups the ties cost
        untied = _analyze(model, gm, shapes, exclude, inputs, {})
        refuse_groups_lost_to_ties(untied, analysis, aliases, exclude, known)
    return build_spec(gm, analysis, exclude, tap_at, aliases, overlapping_views(state))


def _analyze(model: nn.Module, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], exclude: tuple[str, ...],
             inputs: tuple, aliases: dict[str, str]) -> Analysis:
    """The analysis on shape-only tensors, or for real where some op has no shape-only implementation."""
    try:
        return _run_analysis(model, gm, shapes, exclude, inputs, aliases, fake=True)
    except Exception:
        pass
    try:
        return _run_analysis(model, gm, shapes, exclude, inputs, aliases, fake=False)
    except Exception as error:
        raise ValueError(f"running {type(model).__name__} on example_input failed while discovering its "
                         f"permutations: {type(error).__name__}: {error}") from error


def _run_analysis(model: nn.Module, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]],
                  exclude: tuple[str, ...], inputs: tuple, aliases: dict[str, str], fake: bool) -> Analysis:
    """Run the analysis; with ``fake`` on shape-only tensors (FakeTensorMode), so the input size costs nothing."""
    analysis = Analysis(gm, shapes, exclude, aliases, HANDLERS)
    with eval_mode(model), torch.no_grad():
        if not fake:
            analysis.run(*inputs)
            return analysis
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            analysis.run(*(mode.from_tensor(t) if is_tensor(t) else t for t in inputs))
    return analysis
