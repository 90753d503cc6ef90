"""tsc_fast.spec: discovery of permutation groups, applying permutations, invariance, feature taps."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsc_fast.models import MLP, DigitsCNN, PreActResNet18
from tsc_fast.spec import (AxisRef, InvarianceError, PermutationSpec, UnsupportedOperationError,
                           UntraceableModelError, check_invariance, discover, forward_with_taps, permute,
                           permute_state_dict, random_permutations, relative_error)

from _helpers import randomise_bn

torchvision = pytest.importorskip("torchvision")


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


MODELS = {
    "mlp": (lambda: MLP(), (3, 1, 8, 8)),
    "cnn": (lambda: DigitsCNN(), (3, 1, 8, 8)),
    "preact_resnet18": (lambda: PreActResNet18(width=8), (2, 3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)),
}


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    torch.manual_seed(0)
    build, shape = MODELS[request.param]
    return request.param, randomise_bn(build()), torch.randn(*shape)


def test_random_permutations_preserve_function_and_change_weights(model_and_input):
    _, model, x = model_and_input
    spec = discover(model, x)
    assert len(spec.groups) >= 2
    assert check_invariance(model, spec, x, rtol=1e-5, trials=2) <= 1e-5
    perms = random_permutations(spec, seed=3)
    permuted = permute(model, spec, perms)
    before, after = model.state_dict(), permuted.state_dict()
    for group, refs in spec.axes.items():  # every group really moved its tensors
        assert any(not torch.equal(before[r.name], after[r.name]) for r in refs), group
    assert relative_error(outputs(permuted, x), outputs(model, x)) <= 1e-5
    assert "num_batches_tracked" not in " ".join(r.name for refs in spec.axes.values() for r in refs)


def test_permuting_only_part_of_a_group_breaks_invariance():
    """The check can fail: permuting conv3's BN but not conv3 itself (or vice versa) changes the output."""
    torch.manual_seed(0)
    model, x = randomise_bn(DigitsCNN()), torch.randn(4, 1, 8, 8)
    spec = discover(model, x)
    for keep in (lambda r: r.name.startswith("bn3"), lambda r: not r.name.startswith("bn3")):
        broken = PermutationSpec(spec.groups, {g: [r for r in refs if g != "conv3" or keep(r)]
                                               for g, refs in spec.axes.items()})
        with pytest.raises(InvarianceError, match="relative error"):
            check_invariance(model, broken, x)


def test_mode_and_buffers_untouched():
    torch.manual_seed(0)
    model, x = randomise_bn(DigitsCNN()).train(), torch.randn(4, 1, 8, 8)
    state = copy.deepcopy(model.state_dict())
    spec = discover(model, x)
    check_invariance(model, spec, x)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_digits_cnn_groups():
    spec = discover(DigitsCNN(), torch.randn(2, 1, 8, 8))
    assert spec.groups == {"stream": 32, "conv3": 64}
    stream = set(spec.axes["stream"])
    expected = {AxisRef("conv1.weight", 0), AxisRef("conv2.weight", 0), AxisRef("conv2.weight", 1),
                AxisRef("conv3.weight", 1)}
    expected |= {AxisRef(f"bn{i}.{n}", 0) for i in (1, 2) for n in ("weight", "bias", "running_mean", "running_var")}
    assert stream == expected
    conv3 = set(spec.axes["conv3"])
    assert AxisRef("fc.weight", 1) in conv3 and AxisRef("bn3.running_var", 0) in conv3
    assert not any(r.name.startswith("fc.bias") for r in conv3)  # classifier outputs stay fixed


def test_preact_resnet18_groups():
    spec = discover(PreActResNet18(width=8), torch.randn(1, 3, 16, 16))
    expected = {}
    for stage, width in zip(range(1, 5), (8, 16, 32, 64)):
        expected[f"layer{stage}.stream"] = width
        expected[f"layer{stage}.0.conv1"] = width
        expected[f"layer{stage}.1.conv1"] = width
    assert spec.groups == expected
    # the stem conv starts the first stream; shortcut convs join their stage's stream
    assert AxisRef("conv1.weight", 0) in spec.axes["layer1.stream"]
    assert AxisRef("layer2.0.shortcut.0.weight", 0) in spec.axes["layer2.stream"]
    assert AxisRef("layer2.0.shortcut.0.weight", 1) in spec.axes["layer1.stream"]
    assert AxisRef("linear.weight", 1) in spec.axes["layer4.stream"]


def test_spec_print_and_json_round_trip():
    spec = discover(DigitsCNN(), torch.randn(2, 1, 8, 8))
    text = str(spec)
    assert "stream" in text and "conv3" in text and "64" in text and "bn3.running_mean:0" in text
    restored = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec


class FlattenNet(nn.Module):
    """conv -> relu -> flatten(C x 3 x 3) -> linear: the conv's channels own blocks of 9 linear inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(36, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc2(F.relu(self.fc1(h.view(h.shape[0], -1))))


def test_flatten_into_linear_uses_channel_blocks():
    torch.manual_seed(0)
    model, x = FlattenNet().eval(), torch.randn(3, 2, 5, 5)
    spec = discover(model, x)
    assert spec.groups == {"conv": 4, "fc1": 16}
    assert AxisRef("fc1.weight", 1, block=9) in spec.axes["conv"]
    check_invariance(model, spec, x, trials=3)
    # a permutation applied per input (no blocks) is wrong: the check catches it
    unblocked = PermutationSpec(spec.groups, {g: [r._replace(block=1) if r.block > 1 else r for r in refs]
                                              for g, refs in spec.axes.items()})
    with pytest.raises((InvarianceError, ValueError)):
        check_invariance(model, unblocked, x)


# --- permutation validation -----------------------------------------------------------------------------------
def test_permutation_validation_messages():
    model = DigitsCNN()
    spec = discover(model, torch.randn(1, 1, 8, 8))
    good = {"stream": np.arange(32), "conv3": np.arange(64)}
    with pytest.raises(ValueError, match="no permutation given for groups \\['conv3'\\]"):
        permute(model, spec, {"stream": np.arange(32)})
    with pytest.raises(ValueError, match="unknown groups \\['nope'\\]"):
        permute(model, spec, {**good, "nope": np.arange(3)})
    with pytest.raises(ValueError, match="length 31"):
        permute(model, spec, {**good, "stream": np.arange(31)})
    repeated = np.arange(32)
    repeated[0] = 1
    with pytest.raises(ValueError, match="not a permutation"):
        permute(model, spec, {**good, "stream": repeated})
    with pytest.raises(TypeError, match="integers"):
        permute(model, spec, {**good, "stream": np.arange(32) * 1.0})
    # tensors work too, and the state dict given is not modified
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    perm = torch.randperm(32)
    new_state = permute_state_dict(state, spec, {**good, "stream": perm})
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert torch.equal(new_state["conv1.weight"], before["conv1.weight"][perm])
    assert torch.equal(new_state["conv2.weight"], before["conv2.weight"][perm][:, perm])


# --- feature taps ---------------------------------------------------------------------------------------------
def collect(model, spec, x):
    found = {}

    def callback(group, features, channel_axis):
        assert group not in found, "a group was reported twice"
        found[group] = (features.clone(), channel_axis)

    with torch.no_grad():
        out = forward_with_taps(model.eval(), spec, x, callback)
    return found, out


def test_taps_match_manual_features_digits_cnn():
    torch.manual_seed(0)
    model, x = randomise_bn(DigitsCNN()), torch.randn(5, 1, 8, 8)
    spec = discover(model, x)
    found, out = collect(model, spec, x)
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        h = h + F.relu(model.bn2(model.conv2(h)))
        conv3 = F.relu(model.bn3(model.conv3(h)))
        assert torch.allclose(out, model(x))
    assert found["stream"][1] == 1 and found["conv3"][1] == 1
    torch.testing.assert_close(found["stream"][0], h)
    torch.testing.assert_close(found["conv3"][0], conv3)


def test_taps_match_manual_features_mlp_and_resnet18():
    torch.manual_seed(0)
    mlp, x = randomise_bn(MLP()), torch.randn(4, 1, 8, 8)
    found, _ = collect(mlp, discover(mlp, x), x)
    with torch.no_grad():
        hidden1 = F.relu(mlp.net[1](x.flatten(1)))
    torch.testing.assert_close(found["net.1"][0], hidden1)
    assert found["net.1"][1] == -1

    net, x = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10)), torch.randn(2, 3, 32, 32)
    spec = discover(net, x)
    found, _ = collect(net, spec, x)
    with torch.no_grad():  # in-place ReLUs follow these values: the taps must have been read before them
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        block_in = net.layer1(stem)
        block1_relu = net.layer2[0].relu(net.layer2[0].bn1(net.layer2[0].conv1(block_in.clone())))
    torch.testing.assert_close(found["layer1.stream"][0], block_in)
    torch.testing.assert_close(found["layer2.0.conv1"][0], block1_relu)
    for group, size in spec.groups.items():
        features, axis = found[group]
        assert features.shape[axis] == size


def test_taps_of_permuted_model_are_permuted_taps():
    torch.manual_seed(0)
    model, x = randomise_bn(PreActResNet18(width=8)), torch.randn(2, 3, 16, 16)
    spec = discover(model, x)
    perms = random_permutations(spec, seed=1)
    found, _ = collect(model, spec, x)
    found_permuted, _ = collect(permute(model, spec, perms), spec, x)  # same spec reused on another instance
    assert set(found) == set(spec.groups)
    for group, (features, axis) in found.items():
        expected = features.index_select(axis, torch.as_tensor(perms[group]))
        torch.testing.assert_close(found_permuted[group][0], expected, rtol=1e-4, atol=1e-5)


class NoModuleBoundary(nn.Module):
    """The residual stream's last value feeds only a method call, so no hook can see it: a graph tap is needed."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv1(x)
        h = h + torch.tanh(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def test_graph_tap_where_no_module_boundary():
    torch.manual_seed(0)
    model, x = NoModuleBoundary().eval(), torch.randn(2, 3, 5, 5)
    spec = discover(model, x)
    assert spec.taps["stream"].kind == "node"
    other = NoModuleBoundary().eval()  # another instance: the spec is reused by module path
    found, out = collect(other, spec, x)
    with torch.no_grad():
        h = other.conv1(x)
        h = h + torch.tanh(other.conv2(h))
        torch.testing.assert_close(out, other(x))
    torch.testing.assert_close(found["stream"][0], h)


# --- refusals and overrides -----------------------------------------------------------------------------------
class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=1)  # mixes channel order: no channel permutation commutes with it


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent Python control flow: fx cannot trace it


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = inner
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv2(self.inner(F.relu(self.conv1(x))))
        return self.fc(F.relu(h).mean((2, 3)))


def test_unsupported_operation_refused_then_excluded():
    torch.manual_seed(0)
    model, x = Wrapper(Roll()).eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(UnsupportedOperationError) as info:
        discover(model, x)
    message = str(info.value)
    assert "roll" in message and "'conv1'" in message and "exclude=['inner']" in message
    spec = discover(model, x, exclude=["inner"])
    assert spec.groups == {"conv2": 8}  # conv1 feeds the opaque module: its channels stay fixed
    check_invariance(model, spec, x)


def test_untraceable_model_refused_then_excluded():
    torch.manual_seed(0)
    model, x = Wrapper(DataDependent()).eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(UntraceableModelError, match="module 'inner'.*exclude=\\['inner'\\]"):
        discover(model, x)
    spec = discover(model, x, exclude=["inner"])
    assert spec.groups == {"conv2": 8} and spec.exclude == ("inner",)
    check_invariance(model, spec, x)
    with pytest.raises(ValueError, match="do not exist"):
        discover(model, x, exclude=["nowhere"])


class SliceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x)[:, :4].mean((2, 3)))


def test_slicing_a_permutable_axis_is_refused():
    with pytest.raises(UnsupportedOperationError, match="slicing keeps only some units"):
        discover(SliceChannels(), torch.randn(1, 3, 4, 4))


class OpaqueIntoStream(nn.Module):
    """An unknown op's output joins a residual stream: the stream must be refused, not silently frozen."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv1(x)
        h = self.conv2(h) + torch.cumsum(h, dim=1)
        return self.fc(h.mean((2, 3)))


def test_unknown_op_feeding_a_stream_is_refused():
    with pytest.raises(UnsupportedOperationError, match="cumsum"):
        discover(OpaqueIntoStream(), torch.randn(1, 3, 4, 4))


# --- wider coverage: torchvision architectures (reduced sizes keep the suite fast; full sizes in bench/) ---------
def _small_vgg():
    from torchvision.models.vgg import VGG, make_layers
    model = VGG(make_layers([8, "M", 16, "M", 16, 16], batch_norm=True), num_classes=10, init_weights=True)
    model.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(32, 24), nn.ReLU(True), nn.Dropout(), nn.Linear(24, 10))
    return model


def _small_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)


def _small_vit():
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: outputs would all be 0
    return model


WIDE_MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(weights=None, num_classes=10), (1, 3, 32, 32)),
    "wide_resnet_bottleneck": (lambda: torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=128), (1, 3, 32, 32)),
    "vgg_bn": (_small_vgg, (2, 3, 16, 16)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.5),
                     (2, 3, 32, 32)),
    "convnext": (_small_convnext, (2, 3, 16, 16)),
    "vit": (_small_vit, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", sorted(WIDE_MODELS))
def test_invariance_torchvision_architectures(name):
    torch.manual_seed(0)
    build, shape = WIDE_MODELS[name]
    model, x = randomise_bn(build()), torch.randn(*shape)
    spec = discover(model, x)
    assert check_invariance(model, spec, x, rtol=1e-4, trials=2) <= 1e-4
    found, _ = collect(model, spec, x)
    assert set(found) == set(spec.groups)
    for group, (features, axis) in found.items():
        assert features.shape[axis] == spec.groups[group], group


def test_vgg_flatten_after_adaptive_pool_uses_blocks_of_49():
    model = _small_vgg()
    spec = discover(model, torch.randn(1, 3, 16, 16))
    last_conv = [g for g in spec.groups if g.startswith("features.")][-1]
    assert AxisRef("classifier.0.weight", 1, block=49) in spec.axes[last_conv]


def test_depthwise_and_layer_scale_in_convnext():
    spec = discover(_small_convnext(), torch.randn(1, 3, 16, 16))
    stream = spec.axes["features.1.stream"]
    assert AxisRef("features.1.0.block.0.weight", 0) in stream       # depthwise conv moves with its input
    assert AxisRef("features.1.0.layer_scale", 0) in stream          # layer scale (C, 1, 1)
    assert AxisRef("features.1.0.block.2.weight", 0) in stream       # channels-last LayerNorm


def test_attention_heads_are_permuted_as_heads():
    torch.manual_seed(0)
    model, x = randomise_bn(_small_vit()), torch.randn(2, 3, 16, 16)
    spec = discover(model, x)
    path = "encoder.layers.encoder_layer_0.self_attention"
    assert spec.heads[path] == {"num_heads": 4, "groups": [f"{path}.qk", f"{path}.vo"]}
    assert spec.groups[f"{path}.qk"] == 16 and spec.groups["encoder.stream"] == 16
    assert AxisRef("class_token", 2) in spec.axes["encoder.stream"]
    assert AxisRef("encoder.pos_embedding", 2) in spec.axes["encoder.stream"]
    perms = random_permutations(spec, seed=0)
    # the q/k rows at offsets 0 and 16, the value rows at 32 of the packed projection
    assert AxisRef(f"{path}.in_proj_weight", 0, 1, 16) in spec.axes[f"{path}.qk"]
    assert AxisRef(f"{path}.in_proj_weight", 0, 1, 32) in spec.axes[f"{path}.vo"]
    # a permutation that splits heads, or moves qk and vo heads differently, is refused ...
    split = {**perms, f"{path}.qk": np.roll(np.arange(16), 1)}
    with pytest.raises(ValueError, match="splits attention heads"):
        permute(model, spec, split)
    other_order = {**perms, f"{path}.qk": np.arange(16)}
    with pytest.raises(ValueError, match="same order"):
        permute(model, spec, other_order)
    # ... because it would change the function (checked without the head constraint)
    unconstrained = PermutationSpec(spec.groups, spec.axes)
    with pytest.raises(InvarianceError):
        for seed in range(3):
            check_invariance(model, unconstrained, x, seed=seed)
    # taps: q and k projections side by side along tokens (17 tokens each), v projection
    found, _ = collect(model, spec, x)
    assert found[f"{path}.qk"][0].shape == (2, 34, 16) and found[f"{path}.vo"][0].shape == (2, 17, 16)


def test_handler_tables_look_up_by_type_along_the_mro_and_refuse_double_registration():
    import torch.nn.functional as F

    from tsc_fast.spec._analysis import CallTable, ModuleTable
    from tsc_fast.spec._handlers import HANDLERS

    class MyConv(nn.Conv2d):
        pass

    conv_entry = HANDLERS.modules.lookup(nn.Conv2d(1, 2, 3))
    assert conv_entry is not None and HANDLERS.modules.lookup(MyConv(1, 2, 3)).handler is conv_entry.handler
    assert HANDLERS.modules.lookup(nn.Bilinear(2, 2, 2)) is None          # unknown: the analysis treats it as opaque
    assert HANDLERS.functions.lookup(F.relu) is not None and HANDLERS.methods.lookup("view") is not None
    table, calls = ModuleTable(), CallTable("function")
    table.register(nn.ReLU)(lambda an, call: call.x)
    with pytest.raises(ValueError, match="already has a handler"):
        table.register(nn.ReLU)(lambda an, call: call.x)
    calls.register(F.relu)(lambda an, call: None)
    with pytest.raises(ValueError, match="already has a handler"):
        calls.register(F.relu)(lambda an, call: None)
