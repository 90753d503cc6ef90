"""The analysis: an fx Interpreter that runs the traced graph once and links tensor axes, node by node, through
tables of handlers (per module type, per function, per tensor method).

For every node the interpreter computes the value (on shape-only tensors where possible) and asks the handler
registered for the node's operation for the output's layout (see ``_layout``); a handler links the axes the
operation ties together (``self.axes``, see ``_axes``). The tables themselves are filled in the handler modules
(``_module_handlers``, ``_function_handlers``, ``_attention_handlers``; assembled in ``_handlers``). An operation
without a handler is *opaque*: the axes it touches must stay fixed, and a group that would move them is refused
with a message naming the operation (see ``Analysis.opaque``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ._axes import AxisUnion, Dim
from ._layout import Layout, LayoutTree, flatten_layouts, fresh_dims, is_tensor, join, layout_matches
from ._tracing import describe_node


# ---------------------------------------------------------------------------------------------------------------
# What a handler sees, and the tables handlers are registered in
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Call:
    """One call_function / call_method node as its handler sees it: the node, its evaluated arguments and result,
    and the layout ``x`` of its first argument (None where that is not a node with a layout)."""

    node: fx.Node
    args: tuple
    kwargs: dict[str, Any]
    result: Any
    x: LayoutTree

    @property
    def first(self) -> Any:
        """The first argument's value (None for a call without positional arguments)."""
        return self.args[0] if self.args else None


@dataclasses.dataclass(frozen=True)
class ModuleCall(Call):
    """One call_module node as its handler sees it: a Call plus the module called and its path."""

    module: nn.Module
    path: str


ModuleHandler = Callable[["Analysis", ModuleCall], LayoutTree]
CallHandler = Callable[["Analysis", Call], LayoutTree]


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """A module handler; unless ``whole_call``, the call is first checked to be one tensor in, one tensor out."""

    handler: ModuleHandler
    whole_call: bool = False


@dataclasses.dataclass(frozen=True)
class CallEntry:
    """A function or method handler, with the checks the dispatcher makes before calling it.

    ``needs_input_layout``: only called when some argument has a layout (else the output is a constant "created
    by" the op, fixed); ``tensor_result``: only called when the op returns a tensor (else the op is opaque)."""

    handler: CallHandler
    needs_input_layout: bool = True
    tensor_result: bool = True


class ModuleTable:
    """Module handlers by module type, looked up along the module's MRO (as ``isinstance`` would), and recognisers
    for modules known by their structure rather than their type (consulted first)."""

    def __init__(self) -> None:
        self.by_type: dict[type, ModuleEntry] = {}
        self.recognisers: list[tuple[Callable[[nn.Module], bool], ModuleHandler]] = []

    def register(self, *types: type, whole_call: bool = False) -> Callable[[ModuleHandler], ModuleHandler]:
        """Decorator: the handler for modules of ``types`` (and their subclasses)."""
        def decorate(handler: ModuleHandler) -> ModuleHandler:
            for cls in types:
                if cls in self.by_type:
                    raise ValueError(f"module type {cls.__name__} already has a handler")
                self.by_type[cls] = ModuleEntry(handler, whole_call)
            return handler
        return decorate

    def recognise(self, predicate: Callable[[nn.Module], bool]) -> Callable[[ModuleHandler], ModuleHandler]:
        """Decorator: the (whole-call) handler for every module ``predicate`` accepts, whatever its type."""
        def decorate(handler: ModuleHandler) -> ModuleHandler:
            self.recognisers.append((predicate, handler))
            return handler
        return decorate

    def lookup(self, module: nn.Module) -> ModuleEntry | None:
        """The entry for ``module``: a recogniser that accepts it, else its type's, else None."""
        for predicate, handler in self.recognisers:
            if predicate(module):
                return ModuleEntry(handler, whole_call=True)
        for cls in type(module).__mro__:
            entry = self.by_type.get(cls)
            if entry is not None:
                return entry
        return None

    @classmethod
    def merge(cls, *tables: "ModuleTable") -> "ModuleTable":
        """One table holding the entries of ``tables`` (a type registered twice is an error)."""
        merged = cls()
        for table in tables:
            for key, entry in table.by_type.items():
                if key in merged.by_type:
                    raise ValueError(f"module type {key.__name__} has handlers in two tables")
                merged.by_type[key] = entry
            merged.recognisers.extend(table.recognisers)
        return merged


class CallTable:
    """Handlers of call_function nodes (keyed by the function) or call_method nodes (keyed by the method name),
    and recognisers for functions known by name rather than identity (consulted when no key matches)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.by_target: dict[Hashable, CallEntry] = {}
        self.recognisers: list[tuple[Callable[[Any], bool], CallHandler]] = []

    def register(self, *targets: Hashable, needs_input_layout: bool = True, tensor_result: bool = True
                 ) -> Callable[[CallHandler], CallHandler]:
        """Decorator: the handler for calls of ``targets`` (see CallEntry for the flags)."""
        def decorate(handler: CallHandler) -> CallHandler:
            for target in targets:
                if target in self.by_target:
                    raise ValueError(f"{self.kind} {target!r} already has a handler")
                self.by_target[target] = CallEntry(handler, needs_input_layout, tensor_result)
            return handler
        return decorate

    def recognise(self, predicate: Callable[[Any], bool]) -> Callable[[CallHandler], CallHandler]:
        """Decorator: the handler for every target ``predicate`` accepts that has no handler of its own."""
        def decorate(handler: CallHandler) -> CallHandler:
            self.recognisers.append((predicate, handler))
            return handler
        return decorate

    def lookup(self, target: Any) -> CallEntry | None:
        """The entry for ``target``: its own, else a recogniser's, else None."""
        entry = self.by_target.get(target)
        if entry is not None:
            return entry
        return next((CallEntry(handler) for predicate, handler in self.recognisers if predicate(target)), None)


@dataclasses.dataclass(frozen=True)
class Handlers:
    """The tables the analysis dispatches through: modules, functions, tensor methods."""

    modules: ModuleTable
    functions: CallTable
    methods: CallTable


# ---------------------------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------------------------
class Analysis(fx.Interpreter):
    """Runs the traced graph once, linking axes through the handlers; holds what the spec is built from."""

    def __init__(self, gm: fx.GraphModule, state_shapes: dict[str, tuple[int, ...]], exclude: Iterable[str],
                 aliases: dict[str, str], handlers: Handlers):
        super().__init__(gm)
        self.handlers = handlers
        self.axes = AxisUnion(aliases)
        self.state_keys = set(state_shapes)
        self.exclude = set(exclude)
        self.fix_excluded_tensors(state_shapes)
        self.layouts: dict[fx.Node, LayoutTree] = {}
        self.order: dict[fx.Node, int] = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.candidates: list[tuple[int, fx.Node, int, int]] = []  # (axis, node, dim index, ndim)
        self.heads: dict[str, tuple[int, int, int]] = {}  # attention module -> (num_heads, qk axis, vo axis)
        self.producer_inputs: dict[fx.Node, list[int]] = {}  # conv/linear node -> axes of its input channels

    # helpers for handlers -----------------------------------------------------------------------------------
    def fix_excluded_tensors(self, state_shapes: dict[str, tuple[int, ...]]) -> None:
        """Every axis of an excluded module's tensors stays fixed: an opaque module must see its own weights, also
        where they are reached from outside it (a tied tensor, or a get_attr of its parameter)."""
        for name, shape in state_shapes.items():
            path = next((p for p in self.exclude if name.startswith(p + ".")), None)
            if path is not None:
                for d, dim in enumerate(self.fresh(shape, f"tensor of excluded module {path!r}")):
                    self.axes.attach_dim(dim, name, d)

    def fresh(self, shape: Sequence[int], fixed: str | None = None) -> tuple[Dim, ...]:
        """New plain axes, one per size in ``shape`` (fixed, with that reason, when ``fixed`` is given)."""
        return fresh_dims(self.axes, shape, fixed)

    def fresh_dim(self, size: int, fixed: str | None = None) -> Dim:
        """One new plain axis of ``size`` units."""
        return ((self.axes.new(size, fixed), 1),)

    def layout_of(self, arg: Any) -> LayoutTree:
        """The layouts of the nodes inside an argument (None for constants), in the argument's structure."""
        return fx.node.map_aggregate(arg, lambda a: self.layouts.get(a) if isinstance(a, fx.Node) else None)

    def input_layouts(self, node: fx.Node) -> list[Layout]:
        """Every Layout among the node's arguments (nested ones included)."""
        layouts = []

        def visit(value: Any) -> Any:
            if isinstance(value, fx.Node):
                layouts.extend(flatten_layouts(self.layouts.get(value)))
            return value

        fx.node.map_aggregate((node.args, node.kwargs), visit)
        return layouts

    def opaque(self, node: fx.Node, reason: str, result: Any) -> LayoutTree:
        """Unknown op: its inputs must stay unpermuted. Its outputs are new axes: fixed when every input axis is
        fixed anyway (e.g. an op on the raw image), else they carry the same demand, so that an unknown op can
        never silently fix (drop) a group it feeds into, e.g. through a residual add."""
        inert = True
        for layout in self.input_layouts(node):
            for dim in layout:
                self.axes.require_dim(dim, node, reason)
                inert = inert and self.axes.dim_is_inert(dim)
        if inert:
            return self.fixed_like(result, f"output of {describe_node(node)}")
        out = self.fixed_like(result, None)
        for layout in flatten_layouts(out):
            for dim in layout:
                self.axes.require_dim(dim, node, reason + " (its output)")
        return out

    def fixed_like(self, result: Any, reason: str | None) -> LayoutTree:
        """New axes for every tensor in ``result`` (fixed with ``reason``, free when it is None)."""
        if is_tensor(result):
            return Layout(self.fresh(result.shape, reason))
        if isinstance(result, (tuple, list)):
            return type(result)(self.fixed_like(r, reason) for r in result) if not hasattr(result, "_fields") \
                else tuple(self.fixed_like(r, reason) for r in result)
        return None

    def attach_module_tensor(self, n: fx.Node, dim: Dim, path: str, name: str, tensor_dim: int) -> None:
        """Tensor ``name`` of module ``path`` moves along ``dim``; one outside the state_dict pins ``dim``."""
        key = join(path, name)
        if key in self.state_keys:
            self.axes.attach_dim(dim, key, tensor_dim)
        else:
            self.axes.require_dim(dim, n, f"{key!r} is not in the state_dict, so permute() could not permute it")

    # fx.Interpreter hook ------------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        """Run the node, then record its layout and the places its single-axis dims may be tapped."""
        result = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n) if n.op not in ("placeholder", "get_attr", "output") \
            else (None, None)
        layout = self.analyze(n, args, kwargs, result)
        if is_tensor(result) and isinstance(layout, tuple):
            layout = Layout(layout)
        if is_tensor(result) and not layout_matches(self.axes, layout, result.shape):
            layout = self.opaque(n, "its output could not be related to its inputs", result)
        self.layouts[n] = layout
        order = self.order[n]
        for flat in flatten_layouts(layout):
            for i, dim in enumerate(flat):
                for a, _ in dim:
                    self.axes.see(a, order)
                if len(dim) == 1 and dim[0][1] == 1:
                    self.candidates.append((dim[0][0], n, i, len(flat)))
        return result

    def analyze(self, n: fx.Node, args: tuple | None, kwargs: dict | None, result: Any) -> LayoutTree:
        """The layout of node ``n``'s output, by node kind."""
        if n.op == "placeholder":
            return self.fixed_like(result, "model input")
        if n.op == "get_attr":
            return self.get_attr_layout(n, result)
        if n.op == "output":
            for layout in flatten_layouts(self.layout_of(n.args)):
                for dim in layout:
                    self.axes.fix_dim(dim, "model output")
            return None
        x = self.layouts.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if n.op == "call_module":
            return self.call_module_layout(n, args, kwargs, result, x)
        if n.op in ("call_function", "call_method"):
            return self.call_layout(Call(n, tuple(args), kwargs, result, x))
        return self.opaque(n, "unknown fx node kind", result)

    def get_attr_layout(self, n: fx.Node, result: Any) -> LayoutTree:
        """A tensor attribute: a state_dict tensor moves with its axes; any other tensor pins them."""
        if not is_tensor(result):
            return None
        layout = self.fresh(result.shape)
        if n.target in self.state_keys:
            for d, dim in enumerate(layout):
                self.axes.attach_dim(dim, n.target, d)
        else:
            for dim in layout:
                self.axes.require_dim(dim, n, f"tensor attribute {n.target!r} is not in the state_dict, so "
                                              "permute() could not permute it")
        return layout

    # dispatch -----------------------------------------------------------------------------------------------
    def call_module_layout(self, n: fx.Node, args: tuple, kwargs: dict, result: Any, x: LayoutTree
                           ) -> LayoutTree:
        """Excluded modules stay opaque; others go to their handler (one tensor in, one out, unless whole-call)."""
        path = n.target
        module = self.module.get_submodule(path)
        if path in self.exclude:
            return self.excluded_module(n, path, result)
        call = ModuleCall(n, tuple(args), kwargs, result, x, module, path)
        entry = self.handlers.modules.lookup(module)
        if entry is not None and entry.whole_call:
            return entry.handler(self, call)
        name = type(module).__name__
        if not is_tensor(result) or not isinstance(x, Layout) or not args or not is_tensor(args[0]):
            return self.opaque(n, f"{name} is not supported", result)
        if len(n.args) + len(n.kwargs) != 1:
            return self.opaque(n, f"{name} called with extra arguments is not supported", result)
        if entry is None:
            return self.opaque(n, f"{name} is not supported", result)
        return entry.handler(self, call)

    def excluded_module(self, n: fx.Node, path: str, result: Any) -> LayoutTree:
        """An excluded module: its inputs and outputs stay fixed."""
        for layout in self.input_layouts(n):
            for dim in layout:
                self.axes.fix_dim(dim, f"input of excluded module {path!r}")
        return self.fixed_like(result, f"output of excluded module {path!r}")

    def call_layout(self, call: Call) -> LayoutTree:
        """A function or method call goes to its handler, after the checks its entry asks for."""
        n, result = call.node, call.result
        table = self.handlers.methods if n.op == "call_method" else self.handlers.functions
        entry = table.lookup(n.target)
        if (entry is None or entry.needs_input_layout) and not self.input_layouts(n):
            return self.fixed_like(result, f"created by {describe_node(n)}")
        if (entry is None or entry.tensor_result) and not is_tensor(result):
            return self.opaque(n, "returns something other than a tensor", result)
        if entry is None:
            return self.opaque(n, "this operation is not supported", result)
        return entry.handler(self, call)
