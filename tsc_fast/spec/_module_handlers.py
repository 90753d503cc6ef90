"""Handlers of module calls, by module type: convolutions, Linear, Embedding, norms, activations, pooling, reshapes.

Each handler gets a call already checked to take one tensor and return one (``x`` is its input's layout) and
returns the output's layout, linking the module's state_dict tensors to the axes they move with. Attention
modules are in ``_attention_handlers``; a module type without a handler is opaque.
"""
from __future__ import annotations

import torch.nn as nn

from ._analysis import Analysis, ModuleCall, ModuleTable
from ._layout import LayoutTree, coarsen_to_groups, join, reshape_layout, spatial_layout
from ._ops import (
    ACTIVATION_MODULES,
    BATCHNORM_MODULES,
    CONV_MODULES,
    PASSTHROUGH_MODULES,
    POOL_MODULES,
    RESHAPE_MODULES,
)

MODULES = ModuleTable()


@MODULES.register(*ACTIVATION_MODULES, *PASSTHROUGH_MODULES)
def elementwise_module(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Activations, dropout, identity, softmax: every axis kept."""
    return call.x


@MODULES.register(nn.PReLU)
def prelu(an: Analysis, call: ModuleCall) -> LayoutTree:
    """PReLU: a per-channel slope (num_parameters > 1) moves with the channels (dim 1)."""
    if call.module.num_parameters > 1:
        an.axes.attach_dim(call.x[1], join(call.path, "weight"), 0)
    return call.x


@MODULES.register(*CONV_MODULES)
def conv(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Convolution: groups=1 starts a new axis; depthwise and grouped ones move their outputs with their inputs."""
    n, x, module, path = call.node, call.x, call.module, call.path
    weight_name, weight_shape, groups = join(path, "weight"), module.weight.shape, module.groups
    spatial_dims = len(weight_shape) - 2
    channel_index = call.first.dim() - spatial_dims - 1
    channel = x[channel_index]
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    in_channels = in_per_group * groups
    if groups == 1:
        an.producer_inputs[n] = [a for a, _ in channel]
        an.axes.attach_dim(channel, weight_name, 1)
        out = an.fresh_dim(out_channels)
        an.axes.produce(out[0][0], path)
    elif out_channels % in_channels == 0:
        # depthwise (groups == in_channels): output channel j reads input channel j // multiplier only, so it
        # moves with it. Grouped: output group k reads input group k only; the groups may move as whole blocks
        # (order inside kept, as the weight's input dim is shared by all groups), outputs following inputs.
        multiplier = out_channels // in_channels
        out = tuple((a, block * multiplier) for a, block in channel)
        if groups != in_channels:
            an.axes.coarsen_dim(channel, in_per_group, n, f"convolution with {groups} groups")
    else:
        return an.opaque(n, f"grouped convolution with {groups} groups and fewer output than input channels "
                            f"({out_channels} < {in_channels}) is not supported", call.result)
    an.axes.attach_dim(out, weight_name, 0)
    if module.bias is not None:
        an.axes.attach_dim(out, join(path, "bias"), 0)
    batch = x[:channel_index]
    return batch + (out,) + an.fresh(call.result.shape[channel_index + 1:], "spatial axis")


@MODULES.register(nn.Linear)
def linear(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Linear: the last axis is contracted with the weight's columns; its rows start a new axis."""
    x, path = call.x, call.path
    an.producer_inputs[call.node] = [a for a, _ in x[-1]]
    weight_name = join(path, "weight")
    an.axes.attach_dim(x[-1], weight_name, 1)
    out = an.fresh_dim(call.module.out_features)
    an.axes.attach_dim(out, weight_name, 0)
    if call.module.bias is not None:
        an.axes.attach_dim(out, join(path, "bias"), 0)
    if path:
        an.axes.produce(out[0][0], path)
    return x[:-1] + (out,)


@MODULES.register(nn.Embedding)
def embedding(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Embedding: a new trailing axis, the weight's columns (its rows, the vocabulary, stay fixed)."""
    out = an.fresh_dim(call.module.embedding_dim)
    an.axes.attach_dim(out, join(call.path, "weight"), 1)
    an.axes.produce(out[0][0], call.path)
    return call.x + (out,)


@MODULES.register(*BATCHNORM_MODULES)
def batch_norm(an: Analysis, call: ModuleCall) -> LayoutTree:
    """BatchNorm / InstanceNorm: affine parameters and running statistics move with the channels (dim 1)."""
    x = call.x
    channel = x[1] if len(x) > 1 else x[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(call.module, name, None) is not None:
            an.attach_module_tensor(call.node, channel, call.path, name, 0)
    return x


@MODULES.register(nn.LayerNorm)
def layer_norm(an: Analysis, call: ModuleCall) -> LayoutTree:
    """LayerNorm: weight and bias move with the normalised trailing dims (channels-last too)."""
    x = call.x
    k = len(call.module.normalized_shape)
    for name in ("weight", "bias"):
        if getattr(call.module, name, None) is not None:
            for i in range(k):
                an.attach_module_tensor(call.node, x[len(x) - k + i], call.path, name, i)
    return x


@MODULES.register(nn.GroupNorm)
def group_norm(an: Analysis, call: ModuleCall) -> LayoutTree:
    """GroupNorm: channels move only in whole groups (1 < G < C); affine parameters move with them."""
    channel = call.x[1]
    coarsen_to_groups(an.axes, call.node, channel, call.module.num_groups)
    if call.module.weight is not None:
        for name in ("weight", "bias"):
            an.attach_module_tensor(call.node, channel, call.path, name, 0)
    return call.x


@MODULES.register(*POOL_MODULES)
def pool(an: Analysis, call: ModuleCall) -> LayoutTree:
    """Pooling and upsampling: batch and channel axes kept, spatial ones new and fixed."""
    if getattr(call.module, "return_indices", False):
        return an.opaque(call.node, "pooling that returns indices is not supported", call.result)
    return spatial_layout(an.axes, call.x, call.result.shape, type(call.module).__name__)


@MODULES.register(*RESHAPE_MODULES)
def reshape_module(an: Analysis, call: ModuleCall) -> LayoutTree:
    """nn.Flatten / nn.Unflatten: as a view of the same shape (see ``reshape_layout``)."""
    return reshape_layout(an.axes, call.node, call.x, tuple(call.result.shape))
