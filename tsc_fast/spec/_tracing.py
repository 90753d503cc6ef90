"""Tracing: the torch.fx tracer discovery and the node taps use, and how a traced node is named in messages.

Excluded modules and verified qkv-Linear attention blocks stay leaves (one ``call_module`` node each); a module
that cannot be traced is named in the error, with the override (exclude it) where one exists.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..module_tools import eval_mode
from ._attention import qkv_attention_heads
from ._types import UntraceableModelError


class SpecTracer(fx.Tracer):
    """torch.fx tracer that keeps excluded modules opaque and remembers which module failed to trace."""

    def __init__(self, exclude: Iterable[str] = (), attention_blocks: Iterable[str] = ()):
        super().__init__()
        self.exclude = set(exclude)
        self.attention_blocks = set(attention_blocks)
        self.failed_path: str | None = None

    def is_leaf_module(self, module: nn.Module, path: str) -> bool:
        """Excluded modules and verified attention blocks (their head symmetry is known, not derived op by op)."""
        return path in self.exclude or path in self.attention_blocks or super().is_leaf_module(module, path)

    def call_module(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Trace a module call; on failure remember the innermost module that failed."""
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.path_of_module(module)
            raise


def trace(model: nn.Module, exclude: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` (in eval mode, restored afterwards) into a GraphModule sharing its modules."""
    # recognised before tracing: the recognition runs the module, which must not happen inside the tracer
    attention_blocks = [path for path, module in model.named_modules() if qkv_attention_heads(module) is not None]
    tracer = SpecTracer(exclude, attention_blocks)
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as error:
            where = f" (in module {tracer.failed_path!r})" if tracer.failed_path else ""
            hint = (f"exclude that module (discover(model, x, exclude=[{tracer.failed_path!r}])) to treat it as an "
                    "opaque block whose inputs and outputs stay unpermuted, or " if tracer.failed_path else "")
            raise UntraceableModelError(
                f"torch.fx could not trace {type(model).__name__}{where}: {type(error).__name__}: {error}. "
                f"Options: {hint}build a PermutationSpec by hand (PermutationSpec(groups=..., axes=...)).") from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def node_scope(node: fx.Node) -> str:
    """Path of the module whose forward created ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if node.op == "call_module" and path == node.target:  # the called module itself; its caller is the scope
        paths = [v[0] for v in stack.values()]
        return paths[-2] if len(paths) > 1 else ""
    return path


def describe_node(node: fx.Node) -> str:
    """``module 'layer1.0.conv1' (fx node 'layer1_0_conv1' in module 'layer1.0')``, as messages name a node."""
    if node.op == "call_module":
        what = f"module '{node.target}'"
    elif node.op == "call_method":
        what = f"method Tensor.{node.target}"
    elif node.op == "call_function":
        module_name = getattr(node.target, "__module__", "") or ""
        what = f"function {module_name}.{getattr(node.target, '__name__', node.target)}"
        what = what.replace("_operator.", "operator.").lstrip(".")
    else:
        what = f"{node.op} {node.target}"
    scope = node_scope(node)
    return f"{what} (fx node '{node.name}'{f' in module {scope!r}' if scope else ''})"
