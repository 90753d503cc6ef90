"""Alignment and permutation specs on real architectures: head-aware assignment (brute-force optimum), un-/re-align
on transformers and torchvision models (function preserved, known optimum recovered), invariance of full-size
torchvision models, micro-batched statistics equal to whole-batch ones."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import tsc_fast.stats
from tsc_fast.align import realign, solve_heads, unalign, verify_same_function
from tsc_fast.spec import (PermutationSpec, UnsupportedOperationError, check_invariance, discover, head_order,
                           permute, random_permutations)
from tsc_fast.stats import cross_correlations, self_correlations

from _helpers import randomise_bn

torchvision = pytest.importorskip("torchvision")


def loader_of(x: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch)


# --- the two-level head assignment against brute force -------------------------------------------------------------
def _brute_force_head_optimum(costs, num_heads, maximize):
    """Best summed cost over every head-respecting permutation pair (one head order, free within-head orders)."""
    d = costs[0].shape[0] // num_heads
    sign = 1 if maximize else -1
    best = -np.inf
    within_choices = list(itertools.product(itertools.permutations(range(d)), repeat=num_heads))
    for order in itertools.permutations(range(num_heads)):
        total = 0.0
        for cost in costs:  # the groups' within-head choices are independent given the head order
            values = []
            for within in within_choices:
                perm = np.concatenate([order[h] * d + np.array(within[h]) for h in range(num_heads)])
                values.append(sign * cost[np.arange(len(perm)), perm].sum())
            total += max(values)
        best = max(best, total)
    return sign * best


@pytest.mark.parametrize("num_heads,head_dim,maximize", [(2, 3, True), (3, 2, False), (3, 2, True)])
def test_solve_heads_reaches_the_brute_force_optimum(num_heads, head_dim, maximize):
    rng = np.random.default_rng(num_heads * 10 + head_dim)
    size = num_heads * head_dim
    costs = [rng.standard_normal((size, size)) for _ in range(2)]
    perms = solve_heads(costs, num_heads, maximize=maximize)
    orders = [head_order(p, num_heads, f"g{i}") for i, p in enumerate(perms)]   # raises if a head is split
    assert np.array_equal(orders[0], orders[1])
    achieved = sum(c[np.arange(size), p].sum() for c, p in zip(costs, perms))
    assert achieved == pytest.approx(_brute_force_head_optimum(costs, num_heads, maximize), rel=1e-12)


def test_solve_heads_rejects_a_cost_that_does_not_split_into_heads():
    with pytest.raises(ValueError, match="multiple of 4"):
        solve_heads([np.zeros((6, 6))], 4, maximize=True)


# --- transformers: nn.MultiheadAttention (torchvision ViT) ------------------------------------------------------------
def _tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: outputs would all be 0
    return model.eval()


def _assert_same_weights(model, reference):
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


def _check_unalign_and_realign(model, x, batch):
    """Un-align keeps the function and pushes every group's correlation far below the identity's; re-align of a
    random (head-respecting) scramble recovers the original weights exactly and matches every unit perfectly."""
    loader = loader_of(x, batch)
    spec = discover(model, x[:2])
    un = unalign(model, spec, loader)
    verify_same_function(model, un.model, x, rtol=1e-4)
    for g in spec.groups:
        assert un.cost_identity[g] == pytest.approx(spec.groups[g], rel=1e-6)   # self-correlation diagonal is 1
        assert un.cost_achieved[g] < 0.5 * un.cost_identity[g], g
    for path, entry in spec.heads.items():  # heads kept whole, one head order for q/k and v/o
        orders = {tuple(head_order(un.perms[g], entry["num_heads"], g)) for g in entry["groups"]}
        assert len(orders) == 1, path
    scrambled = permute(model, spec, random_permutations(spec, seed=5))
    re = realign(scrambled, model, spec, loader)
    _assert_same_weights(re.model, model)
    for g in spec.groups:
        assert re.cost_achieved[g] == pytest.approx(spec.groups[g], rel=1e-6)
    return spec


def test_vit_unalign_and_realign_respect_heads():
    model = _tiny_vit()
    torch.manual_seed(1)
    spec = _check_unalign_and_realign(model, torch.randn(24, 3, 16, 16), batch=12)
    assert len(spec.heads) == 2


# --- micro-batched statistics equal whole-batch statistics ----------------------------------------------------------
def test_micro_batches_do_not_change_the_statistics(monkeypatch):
    model = _tiny_vit()
    spec = discover(model, torch.randn(2, 3, 16, 16))
    other = permute(model, spec, random_permutations(spec, seed=1))
    torch.manual_seed(2)
    loader = loader_of(torch.randn(20, 3, 16, 16), 10)
    whole = cross_correlations(model, other, spec, loader, micro_batch=10)
    for size in (3, None):
        parts = cross_correlations(model, other, spec, loader, micro_batch=size)
        for g in spec.groups:
            torch.testing.assert_close(parts[g], whole[g], rtol=1e-5, atol=1e-6)
    self_whole = self_correlations(model, spec, loader, micro_batch=10)
    self_parts = self_correlations(model, spec, loader, micro_batch=4)
    monkeypatch.setattr(tsc_fast.stats, "UPDATE_CHUNK_BYTES", 1)   # accumulators fed one sample at a time
    self_sliced = self_correlations(model, spec, loader)
    for g in spec.groups:
        torch.testing.assert_close(self_parts[g], self_whole[g], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(self_sliced[g], self_whole[g], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="micro_batch"):
        self_correlations(model, spec, loader, micro_batch=0)


# --- transformers: the qkv-Linear attention layout (as in timm) ----------------------------------------------------
class QKVAttention(nn.Module):
    """One Linear to 3E, split into heads, softmax(q k^T / sqrt(d)) v, heads merged, output projection."""

    def __init__(self, dim, num_heads, fused=False, proj_bias=True):
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, dim // num_heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class QKVBlock(nn.Module):
    def __init__(self, dim, num_heads, fused):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, num_heads, fused, proj_bias=not fused)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyQKVViT(nn.Module):
    def __init__(self, dim=24, num_heads=3, depth=2, patch=4, image=16, classes=5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.Sequential(*[QKVBlock(dim, num_heads, fused=i % 2 == 1) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_qkv_linear_attention_is_head_aware_and_invariant():
    torch.manual_seed(0)
    model, x = TinyQKVViT().eval(), torch.randn(2, 3, 16, 16)
    spec = discover(model, x)
    for i in range(2):
        path = f"blocks.{i}.attn"
        assert spec.heads[path] == {"num_heads": 3, "groups": [f"{path}.qk", f"{path}.vo"]}
        qk, vo = set(spec.axes[f"{path}.qk"]), set(spec.axes[f"{path}.vo"])
        assert {(r.name, r.offset) for r in qk if r.name.endswith("qkv.weight")} == \
            {(f"{path}.qkv.weight", 0), (f"{path}.qkv.weight", 24)}
        assert any(r.name == f"{path}.proj.weight" and r.dim == 1 for r in vo)
    assert check_invariance(model, spec, x, rtol=1e-5, trials=3) <= 1e-5
    # the head structure is necessary: the same groups permuted freely change the function
    with pytest.raises(AssertionError):
        for seed in range(3):
            check_invariance(model, PermutationSpec(spec.groups, spec.axes), x, seed=seed)
    torch.manual_seed(1)
    _check_unalign_and_realign(model, torch.randn(24, 3, 16, 16), batch=12)


class QKVWithQKNorm(QKVAttention):
    """qk-norm over the head dimension: its weights are shared by all heads, so the layout is not recognised."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.q_norm = nn.LayerNorm(dim // num_heads)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = (self.q_norm(q) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def test_unrecognised_head_split_is_refused_then_excluded():
    model = TinyQKVViT().eval()
    model.blocks[0].attn = QKVWithQKNorm(24, 3)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UnsupportedOperationError, match=r"(?s)blocks\.0\.attn.*qkv-Linear attention"):
        discover(model, x)
    spec = discover(model, x, exclude=["blocks.0.attn"])
    assert "blocks.1.attn.qk" in spec.groups and not any(g.startswith("blocks.0.attn") for g in spec.groups)
    assert check_invariance(model, spec, x, rtol=1e-5) <= 1e-5


# --- grouped convolution and GroupNorm: groups of channels move as whole blocks -------------------------------------
class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.norm2 = nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.GroupNorm(8, 32)
        self.conv3 = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def test_grouped_conv_and_group_norm_move_whole_groups():
    torch.manual_seed(0)
    model = GroupedNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 8, 8)
    spec = discover(model, x)
    # conv1's 16 channels: 4 units of 4 channels (GroupNorm groups, conv2's input groups); conv2's 32 outputs: 8
    # channels per unit, moving with their input group
    assert spec.groups == {"conv1": 4, "conv3": 8}
    assert {("conv1.weight", 4), ("norm1.weight", 4), ("conv2.weight", 8), ("norm2.bias", 8)} <= \
        {(r.name, r.block) for r in spec.axes["conv1"] if r.dim == 0}
    assert not any(r.name == "conv2.weight" and r.dim == 1 for r in spec.axes["conv1"])  # order inside kept
    assert spec.taps["conv1"].unit_channels == 4
    assert PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert check_invariance(model, spec, x, rtol=1e-5, trials=3) <= 1e-5
    torch.manual_seed(1)
    _check_unalign_and_realign(model, torch.randn(24, 3, 8, 8), batch=12)


def test_grouped_conv_with_fewer_outputs_is_refused_then_excluded():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedOperationError, match=r"(?s)grouped convolution with 4 groups.*exclude=\['4'\]"):
        discover(model, x)
    spec = discover(model, x, exclude=["4"])
    assert spec.groups == {"0": 16}   # conv 2 feeds the opaque block: its outputs stay fixed
    assert check_invariance(model, spec, x, rtol=1e-5) <= 1e-5


# --- torchvision models end to end, and full-size coverage ----------------------------------------------------------
def test_torchvision_resnet18_unalign_keeps_function_and_lowers_correlation():
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(16, 3, 24, 24)
    spec = discover(model, x[:2])
    result = unalign(model, spec, loader_of(x, 8))
    verify_same_function(model, result.model, x, rtol=1e-4)
    assert sum(result.cost_achieved.values()) < 0.2 * sum(result.cost_identity.values())
    for g in spec.groups:
        assert result.cost_achieved[g] < 0.5 * result.cost_identity[g], g


def _encoder(build):
    def make():
        model = build()
        model.fc = nn.Identity()   # SSL encoders: features out, no classifier
        return model
    return make


def _vit_b_16_small_images():
    model = torchvision.models.vit_b_16(weights=None, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised head: every output would be 0
    return model


tv = torchvision.models
FULL_SIZE = {  # name: (builder, input side, part of the default suite)
    "resnet18_encoder": (_encoder(tv.resnet18), 32, True),
    "mobilenet_v2": (tv.mobilenet_v2, 32, True),
    "resnext50_32x4d": (tv.resnext50_32x4d, 32, True),
    "resnet18": (tv.resnet18, 32, False),
    "resnet50": (tv.resnet50, 32, False),
    "resnet50_encoder": (_encoder(tv.resnet50), 32, False),
    "wide_resnet50_2": (tv.wide_resnet50_2, 32, False),
    "vgg16_bn": (tv.vgg16_bn, 32, False),
    "vgg19_bn": (tv.vgg19_bn, 32, False),
    "convnext_tiny": (tv.convnext_tiny, 32, False),
    "vit_b_16": (_vit_b_16_small_images, 32, False),
}
RUN_ALL = bool(__import__("os").environ.get("TSC_FAST_FULL_MODELS"))


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_torchvision_models_are_invariant(name):
    build, side, default = FULL_SIZE[name]
    if not (default or RUN_ALL):
        pytest.skip("heavy full-size model: set TSC_FAST_FULL_MODELS=1 (also covered at 224 by bench/bench_spec.py)")
    torch.manual_seed(0)
    model, x = randomise_bn(build()), torch.randn(1, 3, side, side)
    spec = discover(model, x)
    assert len(spec.groups) >= 10
    assert check_invariance(model, spec, x, rtol=1e-4) <= 1e-4
