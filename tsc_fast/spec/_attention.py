"""The qkv-Linear attention layout (as in timm's ``Attention``), recognised by structure and verified numerically.

Layout: one Linear ``qkv`` (C -> 3E, rows: queries, keys, values), a split into ``num_heads`` heads of E / H units,
softmax(q k^T) v per head, heads merged, one Linear ``proj`` (E -> C'). Its symmetry is the same as
nn.MultiheadAttention's: heads move whole (one head order for queries/keys and values/outputs), and inside each
head the query/key units share one permutation and the value units (with ``proj``'s input columns) another.

Discovery cannot derive that symmetry from the graph (the head split reshapes a permutable axis), so a module
qualifies only when (1) it has a ``qkv`` and a ``proj`` nn.Linear, an int ``num_heads`` and no parameters or
buffers besides those Linears' weights and biases, and (2) with random weights, random head-structured
permutations of its units (and random permutations of its input and output channels) leave its output unchanged on
a random input -- a check of the module's code, independent of its trained weights. Anything else is traced
through as usual (and a head split is then refused with a message).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn as nn

QKV_TENSORS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
_RECOGNISED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def qkv_attention_heads(module: nn.Module) -> int | None:
    """``num_heads`` when ``module`` is a verified qkv-Linear attention block, else None (cached per module)."""
    if isinstance(module, nn.MultiheadAttention) or not isinstance(getattr(module, "qkv", None), nn.Linear):
        return None
    key = _structure_key(module)
    cached = _RECOGNISED.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    heads = key[0] if key is not None and _invariant_under_head_permutations(module, key[0]) else None
    _RECOGNISED[module] = (key, heads)
    return heads


def _structure_key(module: nn.Module):
    """Shape facts the recognition depends on, or None when the structure does not qualify."""
    qkv, proj, num_heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads",
                                                                                                None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(num_heads, int)):
        return None
    embed = proj.in_features
    if num_heads < 1 or embed % num_heads or qkv.out_features != 3 * embed:
        return None
    if not set(module.state_dict()) <= QKV_TENSORS:
        return None
    return (num_heads, qkv.in_features, embed, proj.out_features, qkv.bias is not None, proj.bias is not None)


def _head_structured(rng: np.random.Generator, num_heads: int, head_dim: int, order: np.ndarray) -> np.ndarray:
    return (order[:, None] * head_dim + np.stack([rng.permutation(head_dim) for _ in range(num_heads)])).reshape(-1)


def _invariant_under_head_permutations(module: nn.Module, num_heads: int, trials: int = 2) -> bool:
    qkv, proj = module.qkv, module.proj
    embed, channels = proj.in_features, qkv.in_features
    head_dim = embed // num_heads
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.randn(t.shape, generator=gen, dtype=t.dtype) for name, t in module.state_dict().items()}
    x = torch.randn(2, 5, channels, generator=gen, dtype=qkv.weight.dtype)
    rng = np.random.default_rng(0)
    training = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            reference = torch.func.functional_call(module, params, (x,))
            for _ in range(trials):
                order = rng.permutation(num_heads)
                qk = _head_structured(rng, num_heads, head_dim, order)
                vo = _head_structured(rng, num_heads, head_dim, order)
                inputs, outputs = rng.permutation(channels), rng.permutation(proj.out_features)
                rows = torch.from_numpy(np.concatenate([qk, embed + qk, 2 * embed + vo]))
                moved = {"qkv.weight": params["qkv.weight"][rows][:, torch.from_numpy(inputs)],
                         "proj.weight": params["proj.weight"][torch.from_numpy(outputs)][:, torch.from_numpy(vo)]}
                if "qkv.bias" in params:
                    moved["qkv.bias"] = params["qkv.bias"][rows]
                if "proj.bias" in params:
                    moved["proj.bias"] = params["proj.bias"][torch.from_numpy(outputs)]
                out = torch.func.functional_call(module, moved, (x[..., torch.from_numpy(inputs)],))
                expected = reference[..., torch.from_numpy(outputs)]
                if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
                    return False
                if not float((out - expected).norm()) <= 1e-4 * float(expected.norm()):
                    return False
    except Exception:  # a forward that needs other arguments or shapes: not this layout
        return False
    finally:
        for m, flag in training:
            m.training = flag
    return True
