"""tsc_fast.spec with tied tensors: one Parameter or buffer under several state_dict names (issue 12).

A tied tensor must be permuted as one tensor: discovery links the axes of all its names, the spec names it once
(``spec.aliases`` lists the other names), permute() keeps the tie, and check_invariance() runs the model permute()
returns, so a spec that breaks a tie cannot pass.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsc_fast.spec import (AxisRef, InvarianceError, PermutationSpec, UnsupportedOperationError, check_invariance,
                           discover, forward_with_taps, permute, permute_state_dict, random_permutations,
                           relative_error)

from _helpers import randomise_bn

V, D = 11, 6


def outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def spec_names(spec: PermutationSpec) -> set[str]:
    return {r.name for refs in spec.axes.values() for r in refs}


def tied_names(model: nn.Module) -> list[tuple[str, str]]:
    """(first name, other name) for every state_dict name holding an object listed earlier under another name."""
    first: dict[int, str] = {}
    pairs = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            pairs.append((canonical, name))
    return pairs


def assert_ties_kept(original: nn.Module, permuted: nn.Module) -> None:
    """The permuted model shares each tensor the original shares, under the same names."""
    state = permuted.state_dict(keep_vars=True)
    for canonical, alias in tied_names(original):
        assert state[alias] is state[canonical], (canonical, alias)


# --- models ---------------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding(V, D) -> Linear(D, D) -> ReLU -> Linear(D, V), the output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, V)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(F.relu(self.fc(self.embed(idx))))


class TinyGPT(nn.Module):
    """A residual stream through attention and an MLP, with the embedding tied to the output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(8), nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h))


class CalledTwice(nn.Module):
    """conv -> pool -> one nn.Linear applied twice -> classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        h = F.relu(self.fc(h))
        return self.out(F.relu(self.fc(h)))


class AssignedWeight(nn.Module):
    """Two Linear modules share one weight by assignment (``c.weight = b.weight``), each with its own bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


class SharedRunningVar(nn.Module):
    """Two BatchNorms share one running_var buffer (leaf modules: discovery sees both names)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.bn2.running_var = self.bn1.running_var

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        return self.fc(F.relu(self.bn2(self.c2(h))).mean((2, 3)))


class Scale(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x * self.scale


class SharedScaleBuffer(nn.Module):
    """Two modules hold one (C, 1, 1) scale buffer (torch.fx reads it under its first name both times)."""

    def __init__(self):
        super().__init__()
        scale = torch.rand(6, 1, 1) * 2 + 0.1
        self.c1, self.s1 = nn.Conv2d(3, 6, 3, padding=1), Scale(scale)
        self.c2, self.s2 = nn.Conv2d(6, 6, 3, padding=1), Scale(scale)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.s1(self.c1(x)))
        return self.fc(F.relu(self.s2(self.c2(h))).mean((2, 3)))


class TransposedUse(nn.Module):
    """A tied autoencoder: the decoder reads the encoder's weight transposed (one name, used twice)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 7)
        self.dec_bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class TieToInput(nn.Module):
    """``b.weight = a.weight`` where ``a`` reads the model input: the tie links both hidden groups to a fixed axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.d(F.relu(self.b(F.relu(self.a(x)))))


class TransposedView(nn.Module):
    """``b.weight`` is a transposed view of ``a.weight``'s memory: the names cannot be related axis by axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)
        self.b.weight = nn.Parameter(self.a.weight.detach().t())

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class ReachedFromOutside(nn.Module):
    """The root reads an excluded module's weight itself: excluding the module must keep that weight fixed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.inner = nn.Sequential(nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.linear(F.relu(self.fc(x)), self.inner[0].weight)
        return self.out(F.relu(h)) + self.inner(x)[:, :3]


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(seed))


TIED_MODELS = {
    "tied_lm": (TiedLM, _tokens),
    "tiny_gpt": (TinyGPT, _tokens),
    "called_twice": (CalledTwice, lambda seed: torch.randn(2, 3, 4, 4)),
    "assigned_weight": (AssignedWeight, lambda seed: torch.randn(4, 5)),
    "shared_running_var": (SharedRunningVar, lambda seed: torch.randn(2, 3, 4, 4)),
    "shared_scale_buffer": (SharedScaleBuffer, lambda seed: torch.randn(2, 3, 5, 5)),
    "transposed_use": (TransposedUse, lambda seed: torch.randn(4, 5)),
}


def build(name: str):
    torch.manual_seed(0)
    make, make_input = TIED_MODELS[name]
    return randomise_bn(make()), make_input(0)


# --- the tied embedding and output layer ------------------------------------------------------------------------
def test_tied_embedding_head_is_one_tensor_in_the_hidden_group():
    model, idx = build("tied_lm")
    spec = discover(model, idx)
    perms = random_permutations(spec, seed=1)
    permuted = permute(model, spec, perms)
    assert relative_error(outputs(permuted, idx), outputs(model, idx)) <= 1e-6
    assert permuted.head.weight is permuted.embed.weight  # the tie is kept, not just the values
    state = permuted.state_dict()
    assert torch.equal(state["head.weight"], state["embed.weight"])
    assert check_invariance(model, spec, idx, rtol=1e-6, trials=3) <= 1e-6

    assert spec.aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in spec_names(spec)  # the tensor is named once, by its first name
    # the embedding's columns (D) and fc's output are one group: head.weight's columns are embed.weight's
    assert spec.groups == {"embed": D}
    assert {AxisRef("embed.weight", 1), AxisRef("fc.weight", 0), AxisRef("fc.weight", 1),
            AxisRef("fc.bias", 0)} == set(spec.axes["embed"])
    assert not any(r.name == "embed.weight" and r.dim == 0 for r in spec.axes["embed"])  # vocabulary stays fixed
    assert torch.equal(state["embed.weight"], model.embed.weight.detach()[:, perms["embed"]])


def test_permuted_state_dict_gives_aliases_one_tensor_even_without_shared_memory():
    model, idx = build("tied_lm")
    spec = discover(model, idx)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # as from a checkpoint that lost the sharing
    new_state = permute_state_dict(state, spec, random_permutations(spec, seed=2))
    assert new_state["head.weight"] is new_state["embed.weight"]
    assert not torch.equal(new_state["embed.weight"], state["embed.weight"])
    fresh = TiedLM()
    fresh.load_state_dict(new_state)
    assert relative_error(outputs(fresh, idx), outputs(model, idx)) <= 1e-6


def test_check_invariance_runs_the_model_permute_returns():
    """Specs that treat the two names as two tensors used to pass check_invariance; now they cannot."""
    model, idx = build("tied_lm")
    untied = PermutationSpec(  # what discover() produced before ties were understood
        {"embed": D, "fc": D},
        {"embed": [AxisRef("embed.weight", 1), AxisRef("fc.weight", 1)],
         "fc": [AxisRef("fc.bias", 0), AxisRef("fc.weight", 0), AxisRef("head.weight", 1)]})
    with pytest.raises(ValueError, match="'embed.weight' and 'head.weight' are one tensor \\(tied\\)"):
        check_invariance(model, untied, idx)
    # naming only the output layer's columns: the tie drags the embedding along, and the check sees it
    head_only = PermutationSpec({"fc": D}, {"fc": [AxisRef("fc.bias", 0), AxisRef("fc.weight", 0),
                                                   AxisRef("head.weight", 1)]})
    with pytest.raises(InvarianceError, match="relative error"):
        check_invariance(model, head_only, idx)


def test_spec_with_aliases_round_trips_and_refuses_axes_on_an_alias():
    model, idx = build("tied_lm")
    spec = discover(model, idx)
    assert "head.weight = embed.weight" in str(spec)
    restored = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec and restored.aliases == spec.aliases
    assert spec.subset(["embed"]).aliases == spec.aliases
    with pytest.raises(ValueError, match="alias of 'embed.weight'"):
        PermutationSpec({"g": D}, {"g": [AxisRef("head.weight", 1)]}, aliases={"head.weight": "embed.weight"})


def test_taps_of_tied_model_report_the_merged_group():
    model, idx = build("tied_lm")
    spec = discover(model, idx)
    found = {}
    with torch.no_grad():
        forward_with_taps(model.eval(), spec, idx, lambda g, f, axis: found.setdefault(g, (f.shape, axis)))
    shape, axis = found["embed"]
    assert shape[axis] == D


# --- other ways of sharing -----------------------------------------------------------------------------------
def test_module_called_twice():
    model, x = build("called_twice")
    spec = discover(model, x)
    (group,) = [g for g, refs in spec.axes.items() if AxisRef("fc.weight", 0) in refs]
    assert AxisRef("fc.weight", 1) in spec.axes[group]  # both calls' axes: one permutation on both sides
    permuted = permute(model, spec, random_permutations(spec, seed=1))
    assert relative_error(outputs(permuted, x), outputs(model, x)) <= 1e-6
    assert spec.aliases == {}  # one name used twice is no tie


def test_weight_shared_by_assignment():
    model, x = build("assigned_weight")
    spec = discover(model, x)
    permuted = permute(model, spec, random_permutations(spec, seed=1))
    assert relative_error(outputs(permuted, x), outputs(model, x)) <= 1e-6
    assert permuted.c.weight is permuted.b.weight
    assert not torch.equal(permuted.c.bias, model.c.bias)  # c's own bias moves with the tied group
    assert spec.aliases == {"c.weight": "b.weight"} and "c.weight" not in spec_names(spec)
    # b.weight maps group a to group b, and (as c.weight) b to c: all three hidden axes are one group
    assert spec.groups == {"a": 8}


@pytest.mark.parametrize("name,alias,canonical", [("shared_running_var", "bn2.running_var", "bn1.running_var"),
                                                  ("shared_scale_buffer", "s2.scale", "s1.scale")])
def test_buffer_shared_by_two_modules(name, alias, canonical):
    model, x = build(name)
    spec = discover(model, x)
    permuted = permute(model, spec, random_permutations(spec, seed=1))
    assert relative_error(outputs(permuted, x), outputs(model, x)) <= 1e-6
    assert permuted.get_buffer(alias) is permuted.get_buffer(canonical)
    assert not torch.equal(permuted.get_buffer(canonical), model.get_buffer(canonical))
    check_invariance(model, spec, x, rtol=1e-6, trials=2)
    assert spec.aliases == {alias: canonical} and alias not in spec_names(spec)
    assert len(spec.groups) == 1  # the shared per-channel buffer ties the two layers' channels together


# --- ties that forbid a permutation: refused, with the override -----------------------------------------------------
def test_tie_to_a_fixed_axis_is_refused_then_excluded():
    torch.manual_seed(0)
    model, x = TieToInput(), torch.randn(3, 4)
    with pytest.raises(UnsupportedOperationError) as info:
        discover(model, x)
    message = str(info.value)
    assert "'a.weight' (also named 'b.weight')" in message and "model input" in message
    assert "exclude=['b']" in message and "'a' (4 units" in message
    spec = discover(model, x, exclude=["b"])
    assert spec.groups == {}  # b's input and output, and with them the tied weight, stay fixed
    check_invariance(model, spec, x)


def test_excluded_module_keeps_its_tied_weight_fixed():
    """Excluding the output layer fixes the tied tensor everywhere, the embedding's columns included."""
    model, idx = build("tied_lm")
    spec = discover(model, idx, exclude=["head"])
    assert "embed.weight" not in spec_names(spec)
    check_invariance(model, spec, idx, rtol=1e-6, trials=2)


def test_excluded_module_weight_reached_from_outside_stays_fixed():
    torch.manual_seed(0)
    model, x = ReachedFromOutside(), torch.randn(3, 8)
    spec = discover(model, x, exclude=["inner"])
    assert not any(name.startswith("inner.") for name in spec_names(spec))
    check_invariance(model, spec, x, rtol=1e-6, trials=2)


def test_overlapping_views_are_refused_then_excluded():
    torch.manual_seed(0)
    model, x = TransposedView(), torch.randn(3, 4)
    with pytest.raises(UnsupportedOperationError,
                       match="(?s)'a.weight' and 'b.weight' overlaps.*exclude=\\['a', 'b'\\]"):
        discover(model, x)
    check_invariance(model, discover(model, x, exclude=["a", "b"]), x)


# --- property: random permutations of tied models keep the function and the ties ------------------------------
@pytest.mark.parametrize("name", sorted(TIED_MODELS))
def test_random_permutations_of_tied_models_preserve_outputs(name):
    model, x = build(name)
    spec = discover(model, x)
    assert spec.groups, name
    reference = outputs(model, x)
    before = model.state_dict()
    for seed in range(4):
        perms = random_permutations(spec, seed=seed)
        permuted = permute(model, spec, perms)
        assert relative_error(outputs(permuted, x), reference) <= 1e-5, (name, seed)
        assert_ties_kept(model, permuted)
        after = permuted.state_dict()
        for group, refs in spec.axes.items():  # every group really moved its tensors
            assert any(not torch.equal(before[r.name], after[r.name]) for r in refs), (name, group)
        other = _tokens(seed + 1) if x.dtype == torch.int64 else torch.randn_like(x)  # an input never traced
        assert relative_error(outputs(permuted, other), outputs(model, other)) <= 1e-5, (name, seed)
    assert check_invariance(model, spec, x, rtol=1e-5, trials=2) <= 1e-5
