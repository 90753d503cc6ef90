"""discover(): trace a model with torch.fx, link tensor axes per operation, and read off the permutation groups.

The traced graph is run once on the example input (eval mode, no grad) by an fx Interpreter that, node by node,
describes every output dimension as pieces of axes (see ``_axes``) and links the axes each operation ties
together. Operations it does not know mark the axes they touch as "must stay fixed"; if such an axis would
otherwise be permuted, discovery refuses with a message naming the operation and the override.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import re
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ._attention import qkv_attention_heads
from ._axes import AxisClass, AxisUnion, Dim
from ._ties import alias_sets, describe_tie, overlapping_views, tensor_aliases
from ._types import AxisRef, PermutationSpec, Tap, UnsupportedOperationError, UntraceableModelError

# ---------------------------------------------------------------------------------------------------------------
# Operation tables. "Activations" are elementwise nonlinearities (feature taps stop after one); "pass-through"
# ops are elementwise and keep every axis as it is.
# ---------------------------------------------------------------------------------------------------------------
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
                      nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
                      nn.LogSigmoid, nn.Tanhshrink)
PASSTHROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
                nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                     nn.InstanceNorm2d, nn.InstanceNorm3d)
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)

ACTIVATION_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid,
                        torch.sigmoid, F.tanh, torch.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
                        F.elu, F.selu, F.celu, F.mish, F.softplus, F.logsigmoid, F.softsign}
PASSTHROUGH_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                         F.feature_alpha_dropout, torch.exp, torch.abs, torch.neg, operator.neg, operator.pos,
                         torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf, torch.log,
                         F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.zeros_like,
                         torch.ones_like, torch.empty_like, torch.clone, torch.detach}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
PASSTHROUGH_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
                       "cpu", "cuda", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip",
                       "softmax", "log_softmax", "requires_grad_", "type"}
ADD_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
PRODUCT_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div,
                     torch.maximum, torch.minimum}
PRODUCT_METHODS = {"mul", "mul_", "div", "div_"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
REDUCE_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}
POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate}
SHAPE_QUERY_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "get_device"}
NO_EFFECT_FUNCTIONS = {getattr, torch._assert, len}
TAP_POINTS = ("activation", "layer_output")  # where features are read: see discover()


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _scope(node: fx.Node) -> str:
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
    scope = _scope(node)
    return f"{what} (fx node '{node.name}'{f' in module {scope!r}' if scope else ''})"


class _SpecTracer(fx.Tracer):
    """torch.fx tracer that keeps excluded modules opaque and remembers which module failed to trace."""

    def __init__(self, exclude: Iterable[str] = (), attention_blocks: Iterable[str] = ()):
        super().__init__()
        self.exclude = set(exclude)
        self.attention_blocks = set(attention_blocks)
        self.failed_path: str | None = None

    def is_leaf_module(self, module: nn.Module, path: str) -> bool:
        # verified qkv-Linear attention blocks stay whole: their head symmetry is known, not derived op by op
        return path in self.exclude or path in self.attention_blocks or super().is_leaf_module(module, path)

    def call_module(self, module, forward, args, kwargs):
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
    tracer = _SpecTracer(exclude, attention_blocks)
    with _eval_mode(model):
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


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put every module in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# ---------------------------------------------------------------------------------------------------------------
# The analysis: an Interpreter that links axes while it runs the graph on the example input.
# ---------------------------------------------------------------------------------------------------------------
class _Analyzer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, state_shapes: dict[str, tuple[int, ...]], exclude: set[str],
                 aliases: dict[str, str]):
        super().__init__(gm)
        self.axes = AxisUnion(aliases)
        self.state_keys = set(state_shapes)
        self.exclude = exclude
        self.fix_excluded_tensors(state_shapes)
        self.layouts: dict[fx.Node, object] = {}
        self.order: dict[fx.Node, int] = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.candidates: list[tuple[int, fx.Node, int, int]] = []  # (axis, node, dim index, ndim)
        self.heads: dict[str, tuple[int, int, int]] = {}  # attention module -> (num_heads, qk axis, vo axis)
        self.producer_inputs: dict[fx.Node, list[int]] = {}  # conv/linear node -> axes of its input channels

    # helpers -----------------------------------------------------------------------------------------------
    def fix_excluded_tensors(self, state_shapes: dict[str, tuple[int, ...]]) -> None:
        """Every axis of an excluded module's tensors stays fixed: an opaque module must see its own weights, also
        where they are reached from outside it (a tied tensor, or a get_attr of its parameter)."""
        for name, shape in state_shapes.items():
            path = next((p for p in self.exclude if name.startswith(p + ".")), None)
            if path is not None:
                for d, dim in enumerate(self.fresh(shape, f"tensor of excluded module {path!r}")):
                    self.axes.attach_dim(dim, name, d)

    def fresh(self, shape, fixed: str | None = None) -> tuple[Dim, ...]:
        return tuple(((self.axes.new(s, fixed), 1),) for s in shape)

    def fresh_dim(self, size: int, fixed: str | None = None) -> Dim:
        return ((self.axes.new(size, fixed), 1),)

    def layout_of(self, arg):
        return fx.node.map_aggregate(arg, lambda a: self.layouts.get(a) if isinstance(a, fx.Node) else None)

    def opaque(self, node: fx.Node, reason: str, result):
        """Unknown op: its inputs must stay unpermuted. Its outputs are new axes: fixed when every input axis is
        fixed anyway (e.g. an op on the raw image), else they carry the same demand, so that an unknown op can
        never silently fix (drop) a group it feeds into, e.g. through a residual add."""
        inert = True
        for layout in self._all_input_layouts(node):
            for dim in layout:
                self.axes.require_dim(dim, node, reason)
                inert = inert and self.axes.dim_is_inert(dim)
        if inert:
            return self.fixed_like(result, f"output of {describe_node(node)}")
        out = self.fixed_like(result, None)
        for layout in _flatten_layouts(out):
            for dim in layout:
                self.axes.require_dim(dim, node, reason + " (its output)")
        return out

    def _all_input_layouts(self, node):
        layouts = []

        def visit(value):
            if isinstance(value, fx.Node):
                layouts.extend(_flatten_layouts(self.layouts.get(value)))
            return value

        fx.node.map_aggregate((node.args, node.kwargs), visit)
        return layouts

    def fixed_like(self, result, reason: str):
        if _is_tensor(result):
            return Layout(self.fresh(result.shape, reason))
        if isinstance(result, (tuple, list)):
            return type(result)(self.fixed_like(r, reason) for r in result) if not hasattr(result, "_fields") \
                else tuple(self.fixed_like(r, reason) for r in result)
        return None

    # fx.Interpreter hook ------------------------------------------------------------------------------------
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n) if n.op not in ("placeholder", "get_attr", "output") \
            else (None, None)
        layout = self.analyze(n, args, kwargs, result)
        if _is_tensor(result) and isinstance(layout, tuple):
            layout = Layout(layout)
        if _is_tensor(result) and not _layout_matches(self.axes, layout, result.shape):
            layout = self.opaque(n, "its output could not be related to its inputs", result)
        self.layouts[n] = layout
        order = self.order[n]
        for flat in _flatten_layouts(layout):
            for i, dim in enumerate(flat):
                for a, _ in dim:
                    self.axes.see(a, order)
                if len(dim) == 1 and dim[0][1] == 1:
                    self.candidates.append((dim[0][0], n, i, len(flat)))
        return result

    def analyze(self, n: fx.Node, args, kwargs, result):
        if n.op == "placeholder":
            return self.fixed_like(result, "model input")
        if n.op == "get_attr":
            return self.get_attr_layout(n, result)
        if n.op == "output":
            for layout in _flatten_layouts(self.layout_of(n.args)):
                for dim in layout:
                    self.axes.fix_dim(dim, "model output")
            return None
        if n.op == "call_module":
            return self.call_module_layout(n, args, kwargs, result)
        if n.op in ("call_function", "call_method"):
            return self.call_layout(n, args, kwargs, result)
        return self.opaque(n, "unknown fx node kind", result)

    def get_attr_layout(self, n, result):
        if not _is_tensor(result):
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

    # modules -------------------------------------------------------------------------------------------------
    def call_module_layout(self, n, args, kwargs, result):
        path = n.target
        module = self.module.get_submodule(path)
        if path in self.exclude:
            for layout in self._all_input_layouts(n):
                for dim in layout:
                    self.axes.fix_dim(dim, f"input of excluded module {path!r}")
            return self.fixed_like(result, f"output of excluded module {path!r}")
        if isinstance(module, nn.MultiheadAttention):
            return self.attention(n, module, path, args, kwargs, result)
        num_heads = qkv_attention_heads(module)
        if num_heads is not None:
            return self.qkv_attention(n, module, path, num_heads, result)
        x = self.layout_of(n.args[0]) if n.args else None
        if not _is_tensor(result) or not isinstance(x, Layout) or not args or not _is_tensor(args[0]):
            return self.opaque(n, f"{type(module).__name__} is not supported", result)
        if len(n.args) + len(n.kwargs) != 1:
            return self.opaque(n, f"{type(module).__name__} called with extra arguments is not supported", result)
        if isinstance(module, ACTIVATION_MODULES + PASSTHROUGH_MODULES):
            return x
        if isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self.axes.attach_dim(x[1], _join(path, "weight"), 0)
            return x
        if isinstance(module, CONV_MODULES):
            return self.conv(n, x, args[0], module.groups, _join(path, "weight"), module.weight.shape,
                             _join(path, "bias") if module.bias is not None else None, result, producer=path)
        if isinstance(module, nn.Linear):
            self.producer_inputs[n] = [a for a, _ in x[-1]]
            return self.linear(x, _join(path, "weight"), _join(path, "bias") if module.bias is not None else None,
                               module.out_features, producer=path)
        if isinstance(module, nn.Embedding):
            out = self.fresh_dim(module.embedding_dim)
            self.axes.attach_dim(out, _join(path, "weight"), 1)
            self.axes.produce(out[0][0], path)
            return x + (out,)
        if isinstance(module, BATCHNORM_MODULES):
            channel = x[1] if len(x) > 1 else x[0]
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name, None) is not None:
                    self.attach_module_tensor(n, channel, path, name, 0)
            return x
        if isinstance(module, nn.LayerNorm):
            k = len(module.normalized_shape)
            for name in ("weight", "bias"):
                if getattr(module, name, None) is not None:
                    for i in range(k):
                        self.attach_module_tensor(n, x[len(x) - k + i], path, name, i)
            return x
        if isinstance(module, nn.GroupNorm):
            return self.group_norm(n, x, module.num_groups, path, module.weight is not None)
        if isinstance(module, POOL_MODULES):
            if getattr(module, "return_indices", False):
                return self.opaque(n, "pooling that returns indices is not supported", result)
            return self.spatial(x, result, type(module).__name__)
        if isinstance(module, RESHAPE_MODULES):
            return self.reshape(n, x, result.shape)
        return self.opaque(n, f"{type(module).__name__} is not supported", result)

    def attention(self, n, module: nn.MultiheadAttention, path: str, args, kwargs, result):
        """nn.MultiheadAttention: the input projections' rows form a query/key group and a value/output group
        (head-structured: heads move whole and together in both), the output projection starts a new axis."""
        names = ("query", "key", "value")
        nodes = dict(zip(names, n.args))
        nodes.update({k: v for k, v in n.kwargs.items() if k in names})
        layouts = [self.layouts.get(nodes.get(k)) for k in names]
        if not all(isinstance(lay, Layout) for lay in layouts) or not isinstance(result, tuple):
            return self.opaque(n, "MultiheadAttention called with unexpected arguments", result)
        query, key, value = layouts
        embed = module.embed_dim
        qk, vo, out = self.axes.new(embed), self.axes.new(embed), self.axes.new(embed)
        attach = self.axes.attach
        if module._qkv_same_embed_dim:
            weight = _join(path, "in_proj_weight")
            for layout in layouts:
                self.axes.attach_dim(layout[-1], weight, 1)
            attach(qk, AxisRef(weight, 0, 1, 0))
            attach(qk, AxisRef(weight, 0, 1, embed))
            attach(vo, AxisRef(weight, 0, 1, 2 * embed))
        else:
            for layout, proj, axis in zip(layouts, ("q", "k", "v"), (qk, qk, vo)):
                self.axes.attach_dim(layout[-1], _join(path, f"{proj}_proj_weight"), 1)
                attach(axis, AxisRef(_join(path, f"{proj}_proj_weight"), 0))
        if module.in_proj_bias is not None:
            bias = _join(path, "in_proj_bias")
            attach(qk, AxisRef(bias, 0, 1, 0))
            attach(qk, AxisRef(bias, 0, 1, embed))
            attach(vo, AxisRef(bias, 0, 1, 2 * embed))
        if module.bias_k is not None:
            attach(qk, AxisRef(_join(path, "bias_k"), 2))
            attach(vo, AxisRef(_join(path, "bias_v"), 2))
        attach(vo, AxisRef(_join(path, "out_proj.weight"), 1))
        attach(out, AxisRef(_join(path, "out_proj.weight"), 0))
        if module.out_proj.bias is not None:
            attach(out, AxisRef(_join(path, "out_proj.bias"), 0))
        self.axes.produce(qk, _join(path, "qk"))
        self.axes.produce(vo, _join(path, "vo"))
        self.axes.produce(out, _join(path, "out_proj"))
        # keys and values are attended over together: their token axes may only move together
        for dk, dv in zip(key[:-1], value[:-1]):
            self.axes.union_dims(dk, dv, n, describe_node(n))
        self.heads[path] = (module.num_heads, qk, vo)
        for axis in (qk, vo):
            self.axes.see(axis, self.order[n])
        attn_output = Layout(query[:-1] + (((out, 1),),))
        weights = self.fixed_like(result[1], "attention weights") if _is_tensor(result[1]) else None
        return (attn_output, weights)

    def qkv_attention(self, n, module: nn.Module, path: str, num_heads: int, result):
        """A verified qkv-Linear attention block (see ``_attention``): the rows of ``qkv`` form a query/key group
        (queries at offset 0, keys at E) and a value group that also permutes ``proj``'s input columns; both are
        head-structured. ``proj``'s output starts a new axis."""
        x = self.layouts.get(n.args[0]) if len(n.args) == 1 and not n.kwargs else None
        embed = module.proj.in_features
        if not isinstance(x, Layout) or not _is_tensor(result) or result.shape[-1] != module.proj.out_features or \
                len(result.shape) != len(x):
            return self.opaque(n, "qkv attention called with unexpected arguments", result)
        qk, vo, out = self.axes.new(embed), self.axes.new(embed), self.axes.new(module.proj.out_features)
        attach = self.axes.attach
        self.axes.attach_dim(x[-1], _join(path, "qkv.weight"), 1)
        for name in ("qkv.weight", "qkv.bias"):
            if _join(path, name) in self.state_keys:
                attach(qk, AxisRef(_join(path, name), 0, 1, 0))
                attach(qk, AxisRef(_join(path, name), 0, 1, embed))
                attach(vo, AxisRef(_join(path, name), 0, 1, 2 * embed))
        attach(vo, AxisRef(_join(path, "proj.weight"), 1))
        attach(out, AxisRef(_join(path, "proj.weight"), 0))
        if _join(path, "proj.bias") in self.state_keys:
            attach(out, AxisRef(_join(path, "proj.bias"), 0))
        self.axes.produce(qk, _join(path, "qk"))
        self.axes.produce(vo, _join(path, "vo"))
        self.axes.produce(out, _join(path, "proj"))
        self.heads[path] = (num_heads, qk, vo)
        for axis in (qk, vo):
            self.axes.see(axis, self.order[n])
        return Layout(x[:-1] + (((out, 1),),))

    def attach_module_tensor(self, n, dim: Dim, path: str, name: str, tensor_dim: int):
        key = _join(path, name)
        if key in self.state_keys:
            self.axes.attach_dim(dim, key, tensor_dim)
        else:
            self.axes.require_dim(dim, n, f"{key!r} is not in the state_dict, so permute() could not permute it")

    # building blocks shared by modules and functions ---------------------------------------------------------
    def conv(self, n, x, x_value, groups, weight_name, weight_shape, bias_name, result, producer):
        spatial_dims = len(weight_shape) - 2
        channel_index = x_value.dim() - spatial_dims - 1
        channel = x[channel_index]
        out_channels, in_per_group = weight_shape[0], weight_shape[1]
        in_channels = in_per_group * groups
        if groups == 1:
            self.producer_inputs[n] = [a for a, _ in channel]
            self.axes.attach_dim(channel, weight_name, 1)
            out = self.fresh_dim(out_channels)
            self.axes.produce(out[0][0], producer)
        elif out_channels % in_channels == 0:
            # depthwise (groups == in_channels): output channel j reads input channel j // multiplier only, so it
            # moves with it. Grouped: output group k reads input group k only; the groups may move as whole blocks
            # (order inside kept, as the weight's input dim is shared by all groups), outputs following inputs.
            multiplier = out_channels // in_channels
            out = tuple((a, block * multiplier) for a, block in channel)
            if groups != in_channels:
                self.axes.coarsen_dim(channel, in_per_group, n, f"convolution with {groups} groups")
        else:
            return self.opaque(n, f"grouped convolution with {groups} groups and fewer output than input channels "
                                  f"({out_channels} < {in_channels}) is not supported", result)
        self.axes.attach_dim(out, weight_name, 0)
        if bias_name is not None:
            self.axes.attach_dim(out, bias_name, 0)
        batch = x[:channel_index]
        return batch + (out,) + self.fresh(result.shape[channel_index + 1:], "spatial axis")

    def linear(self, x, weight_name, bias_name, out_features, producer):
        self.axes.attach_dim(x[-1], weight_name, 1)
        out = self.fresh_dim(out_features)
        self.axes.attach_dim(out, weight_name, 0)
        if bias_name is not None:
            self.axes.attach_dim(out, bias_name, 0)
        if producer:
            self.axes.produce(out[0][0], producer)
        return x[:-1] + (out,)

    def group_norm(self, n, x, num_groups, path, affine):
        channel = x[1]
        channels = self.axes.dim_size(channel)
        if num_groups not in (1, channels):  # channels may move between groups only as whole groups
            self.axes.coarsen_dim(channel, channels // num_groups, n, f"GroupNorm with {num_groups} groups")
        if affine:
            for name in ("weight", "bias"):
                self.attach_module_tensor(n, channel, path, name, 0)
        return x

    def spatial(self, x, result, op_name: str):
        """Pooling/resizing: leading (batch, channel) axes kept, the spatial ones replaced by new fixed axes."""
        keep = len(x) - _spatial_rank(op_name, len(x))
        return x[:keep] + self.fresh(result.shape[keep:], "spatial axis")

    def reshape(self, n, x, out_shape):
        return _reshape_layout(self.axes, n, x, tuple(out_shape))

    def elementwise(self, n, args, kwargs, result, residual: bool):
        """Broadcasting elementwise op: equal-sized trailing dims are linked; size-1 dims broadcast."""
        operands = [(a, self.layouts[node]) for a, node in _tensor_operands(n, args, kwargs)
                    if isinstance(self.layouts.get(node), Layout)]
        if not operands:
            return self.fixed_like(result, "constant")
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
                    self.axes.union_dims(current, dim, n, describe_node(n))
                    if residual:
                        for a, _ in dim:
                            self.axes.residual_add(a, self.order[n], _scope(n))
        for i in range(ndim):
            if out[i] is None:
                out[i] = self.fresh_dim(result.shape[i], "broadcast axis")
        return tuple(out)

    # functions and methods ----------------------------------------------------------------------------------
    def call_layout(self, n, args, kwargs, result):
        target = n.target
        is_method = n.op == "call_method"
        x = self.layouts.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        first = args[0] if args else None
        if target is operator.getitem:
            return self.getitem(n, first, x, args[1], result)
        if not self._all_input_layouts(n):
            return self.fixed_like(result, f"created by {describe_node(n)}")
        tensors = [a for a, _ in _tensor_operands(n, args, kwargs)]
        if target in NO_EFFECT_FUNCTIONS or (is_method and target in SHAPE_QUERY_METHODS):
            return self.fixed_like(result, "shape query") if _is_tensor(result) else None
        if not _is_tensor(result):
            return self.opaque(n, "returns something other than a tensor", result)
        if (not is_method and target in ACTIVATION_FUNCTIONS | PASSTHROUGH_FUNCTIONS) or \
                (is_method and target in ACTIVATION_METHODS | PASSTHROUGH_METHODS):
            if _is_tensor(first) and first.shape == result.shape and len(tensors) == 1:
                return x
            return self.opaque(n, "elementwise op with unexpected arguments", result)
        if (not is_method and target in ADD_FUNCTIONS) or (is_method and target in ADD_METHODS):
            return self.elementwise(n, args, kwargs, result, residual=True)
        if (not is_method and target in PRODUCT_FUNCTIONS) or (is_method and target in PRODUCT_METHODS):
            return self.elementwise(n, args, kwargs, result, residual=False)
        if (not is_method and target in RESHAPE_FUNCTIONS) or (is_method and target in RESHAPE_METHODS):
            return self.reshape(n, x, result.shape)
        if (not is_method and target in REDUCE_FUNCTIONS) or (is_method and target in REDUCE_METHODS):
            return self.reduce(n, x, first, args, kwargs, result)
        if not is_method and target in POOL_FUNCTIONS:
            if kwargs.get("return_indices") or (target in (F.max_pool2d,) and len(args) > 6 and args[6]):
                return self.opaque(n, "pooling that returns indices is not supported", result)
            return self.spatial(x, result, target.__name__)
        if (not is_method and target in (torch.permute, torch.transpose)) or \
                (is_method and target in ("permute", "transpose", "t")):
            return self.permute_dims(n, x, first, args, kwargs, result)
        if (not is_method and target in (torch.matmul, operator.matmul, torch.bmm)) or \
                (is_method and target in ("matmul", "bmm")):
            return self.matmul(n, args, result)
        if not is_method and target is F.linear:
            return self.functional_linear(n, args, kwargs, result)
        if not is_method and target in (F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm):
            return self.functional_norm(n, x, first, args, kwargs, result)
        if not is_method and _is_stochastic_depth(target):
            return x  # identity in eval; in training a per-sample scale, the same for every unit
        if (not is_method and target in (torch.cat, torch.concat, torch.concatenate)):
            return self.concatenate(n, args, kwargs, result)
        if is_method and target in ("expand", "expand_as"):
            return self.expand(x, first, result)
        return self.opaque(n, "this operation is not supported", result)

    def getitem(self, n, container, layout, index, result):
        if not _is_tensor(container):
            if isinstance(layout, (tuple, list)) and isinstance(index, int) and _is_tensor(result):
                item = layout[index]
                return item if isinstance(item, Layout) else self.fixed_like(result, "item")
            return self.fixed_like(result, "item") if _is_tensor(result) else None
        return _index_layout(self, n, container, layout, index, result)

    def reduce(self, n, x, first, args, kwargs, result):
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if dims is None or dims == ():
            reduced = set(range(first.dim()))
        else:
            reduced = {d % first.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
        out = []
        for i, dim in enumerate(x):
            if i not in reduced:
                out.append(dim)
            elif keepdim:
                out.append(self.fresh_dim(1, "reduced axis"))
        # sums and means over units are unchanged by permuting them, so reduced axes need no constraint
        return tuple(out)

    def permute_dims(self, n, x, first, args, kwargs, result):
        ndim = first.dim()
        if n.target in ("permute",) or n.target is torch.permute:
            order = args[1:] if n.op == "call_method" else args[1]
            if n.op == "call_method" and len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = order[0]
            order = kwargs.get("dims", order)
            return tuple(x[d % ndim] for d in order)
        if n.target == "t":
            d0, d1 = 0, ndim - 1
        else:
            d0, d1 = args[1] % ndim, args[2] % ndim
        out = list(x)
        out[d0], out[d1] = out[d1], out[d0]
        return tuple(out)

    def matmul(self, n, args, result):
        (a, b), (la, lb) = args[:2], (self.layouts.get(n.args[0]), self.layouts.get(n.args[1]))
        if not (_is_tensor(a) and _is_tensor(b) and isinstance(la, Layout) and isinstance(lb, Layout)):
            return self.opaque(n, "matmul with unexpected arguments", result)
        if a.dim() < 2 or b.dim() < 2:
            return self.opaque(n, "matmul of 1-D tensors is not supported", result)
        self.axes.union_dims(la[-1], lb[-2], n, describe_node(n))  # contracted axis: permute both alike
        batch = self.elementwise_batch(n, la[:-2], lb[:-2], a.shape[:-2], b.shape[:-2], result.shape[:-2])
        return batch + (la[-2], lb[-1])

    def elementwise_batch(self, n, la, lb, sa, sb, sout):
        out = []
        for i in range(1, len(sout) + 1):
            da = la[-i] if i <= len(la) and sa[-i] != 1 else None
            db = lb[-i] if i <= len(lb) and sb[-i] != 1 else None
            if da is not None and db is not None:
                self.axes.union_dims(da, db, n, describe_node(n))
            out.append(da or db or self.fresh_dim(sout[-i], "broadcast axis"))
        return tuple(reversed(out))

    def functional_linear(self, n, args, kwargs, result):
        weight_node = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        bias_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        x, w = self.layouts.get(n.args[0]), self.layouts.get(weight_node)
        if not isinstance(x, Layout) or not isinstance(w, Layout) or len(w) != 2:
            return self.opaque(n, "F.linear with unexpected arguments", result)
        self.axes.union_dims(x[-1], w[1], n, describe_node(n))
        if isinstance(bias_node, fx.Node) and isinstance(self.layouts.get(bias_node), Layout):
            self.axes.union_dims(self.layouts[bias_node][0], w[0], n, describe_node(n))
        if weight_node.op == "get_attr":
            self.axes.produce(w[0][0][0], weight_node.target.rpartition(".")[0])
        return x[:-1] + (w[0],)

    def functional_norm(self, n, x, first, args, kwargs, result):
        """F.layer_norm: weight/bias follow the normalised trailing dims; the others: per-channel tensors (dim 1)."""
        names = {F.layer_norm: ("input", "normalized_shape", "weight", "bias"),
                 F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias"),
                 F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias"),
                 F.group_norm: ("input", "num_groups", "weight", "bias")}[n.target]
        bound = dict(zip(names, n.args))
        bound.update({k: v for k, v in n.kwargs.items() if k in names})
        if n.target is F.layer_norm:
            k = len(bound["normalized_shape"]) if not isinstance(bound["normalized_shape"], int) else 1
            targets = x[len(x) - k:]
        else:
            targets = (x[1],)
            if n.target is F.group_norm:
                self.group_norm(n, x, bound["num_groups"], "", affine=False)
        for name in names[1:]:
            tensor = bound.get(name)
            if isinstance(tensor, fx.Node) and isinstance(self.layouts.get(tensor), Layout):
                layout = self.layouts[tensor]
                if len(layout) != len(targets):
                    return self.opaque(n, f"{name} of unexpected shape", result)
                for a, b in zip(layout, targets):
                    self.axes.union_dims(a, b, n, describe_node(n))
        return x

    def concatenate(self, n, args, kwargs, result):
        tensor_nodes = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % result.dim()
        layouts = [self.layouts.get(t) for t in tensor_nodes]
        if not all(isinstance(lay, Layout) and len(lay) == result.dim() for lay in layouts):
            return self.opaque(n, "concatenation of tensors of different ranks", result)
        out = list(layouts[0])
        for lay in layouts[1:]:
            for i in range(result.dim()):
                if i != dim:
                    self.axes.union_dims(out[i], lay[i], n, describe_node(n))
        out[dim] = _simplify(self.axes, tuple(piece for lay in layouts for piece in lay[dim]), "concatenated axis")
        return tuple(out)

    def expand(self, x, first, result):
        lead = result.dim() - first.dim()
        out = list(self.fresh(result.shape[:lead], "broadcast axis"))
        for i, dim in enumerate(x):
            if first.shape[i] == 1 and result.shape[lead + i] != 1:
                out.append(self.fresh_dim(result.shape[lead + i], "broadcast axis"))
            else:
                out.append(dim)
        return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Pure layout helpers
# ---------------------------------------------------------------------------------------------------------------
def _is_stochastic_depth(target) -> bool:
    return getattr(target, "__name__", "") == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Layout(tuple):
    """The dims of one tensor (a tuple of Dim); its own type so that tuples of tensors are told apart."""


def _is_layout(value) -> bool:
    return isinstance(value, Layout)


def _flatten_layouts(value) -> list:
    if value is None:
        return []
    if _is_layout(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [lay for v in value for lay in _flatten_layouts(v)]
    if isinstance(value, dict):
        return [lay for v in value.values() for lay in _flatten_layouts(v)]
    return []


def _layout_matches(axes: AxisUnion, layout, shape) -> bool:
    return _is_layout(layout) and len(layout) == len(shape) and all(
        axes.dim_size(dim) == size for dim, size in zip(layout, shape))


def _tensor_operands(n: fx.Node, args, kwargs) -> list[tuple[torch.Tensor, fx.Node]]:
    found = []
    for value, node in zip(list(args) + list(kwargs.values()), list(n.args) + list(n.kwargs.values())):
        if _is_tensor(value) and isinstance(node, fx.Node):
            found.append((value, node))
        elif isinstance(value, (list, tuple)) and isinstance(node, (list, tuple)):
            found.extend((v, nd) for v, nd in zip(value, node) if _is_tensor(v) and isinstance(nd, fx.Node))
    return found


def _spatial_rank(op_name: str, ndim: int) -> int:
    """Number of trailing (spatial) dims a pooling/resize op rewrites: from its name (``...2d``), else ndim - 2."""
    match = re.search(r"([123])d$", op_name.lower())
    return int(match.group(1)) if match else max(ndim - 2, 1)


def _simplify(axes: AxisUnion, dim, reason: str):
    """A dim whose pieces can carry no permutation becomes one plain fixed axis (keeps later links simple)."""
    if len(dim) == 1 and dim[0][1] == 1:
        return dim
    if axes.dim_is_inert(dim):
        return ((axes.new(axes.dim_size(dim), reason), 1),)
    return dim


def _reshape_layout(axes: AxisUnion, n, x, out_shape):
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


def _reshape_run(axes: AxisUnion, n, in_dims, out_sizes):
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
        return [_simplify(axes, merged, "flattened axis")]
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


def _index_layout(an: _Analyzer, n, value, layout, index, result):
    index = index if isinstance(index, tuple) else (index,)
    if any(_is_tensor(i) or isinstance(i, (list, fx.Node)) for i in index):
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


# ---------------------------------------------------------------------------------------------------------------
# Groups, names and taps from the analysed classes
# ---------------------------------------------------------------------------------------------------------------
def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _group_name(cls: AxisClass) -> str:
    if cls.residual_scopes:
        prefix = _common_prefix([scope for _, scope in cls.residual_scopes])
        return f"{prefix}.stream" if prefix else "stream"
    if cls.producers:
        return cls.producers[0]
    return cls.refs[0].name.rpartition(".")[0] or cls.refs[0].name


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}.{k}", k + 1
    taken.add(candidate)
    return candidate


def _refusal(name: str, cls: AxisClass) -> str:
    first_reason: dict[fx.Node, str] = {}
    for node, reason in cls.requirements:
        first_reason.setdefault(node, reason)
    lines = [f"  - {describe_node(node)}: {reason}" for node, reason in list(first_reason.items())[:5]]
    if len(first_reason) > 5:
        lines.append(f"  - ... and {len(first_reason) - 5} more operations")
    paths = []
    for node in first_reason:
        path = node.target if node.op == "call_module" else _scope(node)
        if path and path not in paths:
            paths.append(path)
    tensors = ", ".join(sorted({r.name for r in cls.refs})[:4])
    override = (f"exclude the module doing it (discover(model, x, exclude={paths[:3]!r})) so its inputs and outputs "
                "stay unpermuted" if paths else "exclude the module containing it (discover(..., exclude=[path]))")
    return (f"cannot prove that permuting group {name!r} ({cls.size} units; tensors {tensors}, ...) keeps the "
            f"function, because an operation touching it is not understood:\n" + "\n".join(lines) +
            f"\nOverride: {override}, or write the PermutationSpec by hand (PermutationSpec(groups=..., axes=...)).")


def discover(model: nn.Module, example_input, exclude: Iterable[str] = (), tap_at: str = "activation"
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
    shapes = {name: tuple(t.shape) for name, t in state.items() if _is_tensor(t)}
    aliases = tensor_aliases(state)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    analyzer = _analyze(model, gm, shapes, exclude, inputs, aliases)
    if aliases:  # what the names would allow untied tells which groups the ties cost
        untied = _analyze(model, gm, shapes, exclude, inputs, {})
        _refuse_groups_lost_to_ties(untied, analyzer, aliases, exclude, known)
    return _build_spec(model, gm, analyzer, exclude, tap_at, aliases, overlapping_views(state))


def _analyze(model, gm, shapes, exclude, inputs, aliases: dict[str, str]) -> "_Analyzer":
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


def _run_analysis(model, gm, shapes, exclude, inputs, aliases, fake: bool) -> "_Analyzer":
    """Run the analysis; with ``fake`` on shape-only tensors (FakeTensorMode), so the input size costs nothing."""
    analyzer = _Analyzer(gm, shapes, set(exclude), aliases)
    with _eval_mode(model), torch.no_grad():
        if not fake:
            analyzer.run(*inputs)
            return analyzer
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            analyzer.run(*(mode.from_tensor(t) if _is_tensor(t) else t for t in inputs))
    return analyzer


def _permutable_classes(analyzer: _Analyzer) -> list[AxisClass]:
    """Classes that become groups (not fixed, more than one unit, moving some state_dict tensor), in graph order."""
    classes = analyzer.axes.classes()
    return sorted((c for c in classes.values() if c.fixed is None and _units(c) > 1 and c.refs),
                  key=lambda c: c.first_seen)


def _group_names(permutable: list[AxisClass]) -> dict[int, str]:
    names: dict[int, str] = {}
    taken: set[str] = set()
    for cls in permutable:
        names[cls.root] = _unique(_group_name(cls), taken)
    return names


def _build_spec(model, gm, analyzer: _Analyzer, exclude, tap_at: str, aliases: dict[str, str],
                overlaps: list[tuple[str, str]]) -> PermutationSpec:
    permutable = _permutable_classes(analyzer)
    names = _group_names(permutable)
    refused = [cls for cls in permutable if cls.requirements]
    if refused:
        raise UnsupportedOperationError("\n".join(_refusal(names[c.root], c) for c in refused))
    _check_disjoint_refs(permutable, names, aliases)
    _refuse_overlapping_views(permutable, names, aliases, overlaps)
    candidates: dict[int, list[tuple[fx.Node, int, int]]] = {}
    for axis, node, dim, ndim in analyzer.candidates:
        candidates.setdefault(analyzer.axes.find(axis), []).append((node, dim, ndim))
    streams = {c.root for c in permutable if c.residual_scopes}
    groups, axes, taps = {}, {}, {}
    attention_taps = {}
    heads = {}
    for path, (num_heads, qk, vo) in analyzer.heads.items():
        qk_root, vo_root = analyzer.axes.find(qk), analyzer.axes.find(vo)
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
        groups[name] = _units(cls)
        axes[name] = sorted((AxisRef(r.name, r.dim, r.block * cls.granularity, r.offset) for r in cls.refs),
                            key=lambda r: (r.name, r.dim, r.offset))
        tap = attention_taps.get(cls.root) or _choose_tap(cls, candidates.get(cls.root, []), analyzer, gm,
                                                          tap_at, streams)
        if tap is not None:
            taps[name] = dataclasses.replace(tap, unit_channels=cls.granularity)
    return PermutationSpec(groups, axes, taps, exclude, heads, aliases)


def _under(name: str, paths) -> bool:
    """Whether state_dict name ``name`` belongs to one of the module ``paths`` (or their submodules)."""
    return any(name.startswith(p + ".") for p in paths)


def _refuse_groups_lost_to_ties(untied: _Analyzer, tied: _Analyzer, aliases: dict[str, str], exclude,
                                modules: dict[str, nn.Module]) -> None:
    """Refuse where tying fixes groups that the names alone would permute (the tie links them to a fixed axis, or
    to blocks they do not fit): keeping the tie costs those groups, which must not pass unnoticed. Ties through an
    excluded module count as accepted: excluding it already keeps its tensors fixed."""
    sets = alias_sets(aliases)
    tied_classes = tied.axes.classes()
    untied_permutable = _permutable_classes(untied)
    names = _group_names(untied_permutable)
    lost: list[tuple[str, int, str, list[str]]] = []   # (group, units, why fixed, canonical names of its ties)
    for cls in untied_permutable:
        ref = cls.refs[0]
        owner = tied.axes.ref_owner.get((aliases.get(ref.name, ref.name), ref.dim, ref.block, ref.offset))
        tied_cls = tied_classes[tied.axes.find(owner)] if owner is not None else None
        if tied_cls is None or (tied_cls.fixed is None and _units(tied_cls) > 1):
            continue
        tensors = {r.name for r in tied_cls.refs}
        involved = [c for c in sets if c in tensors] or list(sets)
        if all(any(_under(m, exclude) for m in sets[c]) for c in involved):
            continue
        why = tied_cls.fixed or (f"axes that move only in blocks of {tied_cls.granularity} entries (grouped "
                                 f"convolution or GroupNorm), which {tied_cls.size} entries do not split into")
        lost.append((names[cls.root], _units(cls), why, involved))
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


def _units(cls: AxisClass) -> int:
    """Units of a class moved in blocks of ``granularity`` entries (1 -- nothing to permute -- if they do not fit)."""
    return cls.size // cls.granularity if cls.size % cls.granularity == 0 else 1


def _check_disjoint_refs(permutable: list[AxisClass], names: dict[int, str], aliases: dict[str, str]) -> None:
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


# taps ------------------------------------------------------------------------------------------------------------
_MUTATING_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_}


def _is_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
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
    return user.op == "call_function" and user.target in _MUTATING_FUNCTIONS and bool(user.args) and \
        user.args[0] is node


def _choose_tap(cls: AxisClass, candidates, analyzer: _Analyzer, gm: fx.GraphModule, tap_at: str,
                streams: set[int]) -> Tap | None:
    """Where a group's features are read (see ``discover``'s ``tap_at``). With ``"activation"``: a residual stream
    after its last residual add (then through a following activation), other groups at the producer's output
    followed through BN and the next activation. Falls back to the first place the units appear."""
    if not candidates:
        return None
    where = {node: (dim, ndim) for node, dim, ndim in reversed(candidates)}  # first dim per node
    order = analyzer.order
    if tap_at == "layer_output":
        producer = _first_branch_producer(cls, where, analyzer, streams)
        if producer is not None:
            dim, ndim = where[producer]
            return _tap_for_node(producer, -1 if dim == ndim - 1 else dim, gm, order)
    if cls.residual_scopes:
        last_add = max(order_ for order_, _ in cls.residual_scopes)
        start = next((node for node in where if order[node] == last_add), None)
        through_norm = False
    else:
        start = next((node for node, _, _ in candidates if node.op in ("call_module", "call_function") and
                      _produces(node, cls, analyzer)), None)
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


def _first_branch_producer(cls: AxisClass, where, analyzer: _Analyzer, streams: set[int]) -> fx.Node | None:
    """The first layer in execution order that produces the group's units, skipping projection shortcuts (layers
    reading another residual stream: a stage's 1x1 downsampling conv) -- for a stream, its stem or the first
    residual branch's last layer."""
    producers = sorted((node for node in where if _produces(node, cls, analyzer)), key=analyzer.order.get)

    def reads_other_stream(node: fx.Node) -> bool:
        roots = {analyzer.axes.find(a) for a in analyzer.producer_inputs.get(node, [])}
        return any(r in streams and r != cls.root for r in roots)

    return next((n for n in producers if not reads_other_stream(n)), producers[0] if producers else None)


def _produces(node: fx.Node, cls: AxisClass, analyzer: _Analyzer) -> bool:
    if node.op == "call_module":
        return node.target in cls.producers
    return node.op == "call_function" and node.target is F.linear


def _call_index(node: fx.Node, order: dict[fx.Node, int]) -> int:
    """Which call of its module ``node`` is within one forward pass (graph order is execution order)."""
    return sum(1 for other in order if other.op == "call_module" and other.target == node.target and
               order[other] < order[node])


def _tap_for_node(node: fx.Node, channel_axis: int, gm: fx.GraphModule, order: dict[fx.Node, int]) -> Tap:
    if node.op == "call_module":
        return Tap(node.target, "output", 0, _call_index(node, order), channel_axis, node.name)
    if not any(_mutates(user, node, gm) for user in node.users):
        for user in node.users:
            if user.op == "call_module" and node in user.args:
                return Tap(user.target, "input", list(user.args).index(node), _call_index(user, order), channel_axis,
                           node.name)
    return Tap("", "node", 0, 0, channel_axis, node.name)
