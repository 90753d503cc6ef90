"""Kinds of operations, by module type, function and tensor method: the vocabulary the handler tables are
registered with (``_module_handlers``, ``_function_handlers``) and tap choice walks by (``_tap_choice``).

"Activations" are elementwise nonlinearities (feature taps stop after one); "pass-through" ops are elementwise and
keep every axis as it is.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

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
PERMUTE_FUNCTIONS = {torch.permute, torch.transpose}
PERMUTE_METHODS = {"permute", "transpose", "t"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
NORM_FUNCTIONS = {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm}
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
EXPAND_METHODS = {"expand", "expand_as"}
SHAPE_QUERY_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "get_device"}
NO_EFFECT_FUNCTIONS = {getattr, torch._assert, len}
# ops that may write into their first argument (a tap must not read a value one of these later changes)
MUTATING_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_}


def is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (recognised by name: torchvision need not be installed)."""
    return getattr(target, "__name__", "") == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision")
