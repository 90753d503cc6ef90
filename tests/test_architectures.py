"""Architecture specs (tsc_fast.architectures) and loading checkpoints into the models they build."""
import os
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from tsc_fast.architectures import (
    ArchitectureError,
    MissingDependencyError,
    build_architecture,
    describe_architecture,
    parse_architecture,
)
from tsc_fast.models import ARCHITECTURES, DigitsCNN
from tsc_fast.models import build_classifier
from tsc_fast.model_io import load_into, save_model

USER_MODULE = """
import torch.nn as nn


def make_net(num_classes, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def fixed_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def anything(**kwargs):
    model = nn.Linear(2, kwargs.get("num_classes", 1))
    model.received = sorted(kwargs)
    return model


def lazy(num_classes):
    import {sibling}  # imported when called: the current directory must still be on sys.path
    return {sibling}.head(num_classes)


class Zoo:
    @staticmethod
    def small(num_classes):
        return nn.Linear(3, num_classes)


def broken(num_classes):
    raise ValueError("boom")


def not_a_model(num_classes):
    return [nn.Linear(1, num_classes)]


instance = nn.Linear(2, 2)
NUMBER = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write modules into a fresh working directory; returns ``write(name, source) -> name``.

    The directory is NOT put on sys.path here: build_architecture must do that itself. Imported modules are
    dropped from sys.modules afterwards so tests cannot see each other's files.
    """
    monkeypatch.chdir(tmp_path)
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def zoo(user_module):
    """The module above (as ``zoo_models``) with its sibling ``zoo_heads``."""
    user_module("zoo_heads", "import torch.nn as nn\n\ndef head(num_classes):\n    return nn.Linear(5, num_classes)\n")
    return user_module("zoo_models", USER_MODULE.replace("{sibling}", "zoo_heads"))


def out_shape(model: nn.Module, *input_shape: int) -> tuple:
    with torch.no_grad():
        return tuple(model.eval()(torch.rand(*input_shape)).shape)


# --- the four doors ----------------------------------------------------------------------------------------------

def test_package_model_is_build_classifiers_model():
    model = build_architecture("cnn", num_classes=10, image_shape=(1, 8, 8), seed=3)
    assert isinstance(model, DigitsCNN) and out_shape(model, 2, 1, 8, 8) == (2, 10)
    reference = build_classifier("cnn", (1, 8, 8), 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    mlp = build_architecture("mlp", num_classes=4, image_shape=(3, 5, 6))
    assert out_shape(mlp, 2, 3, 5, 6) == (2, 4)


def test_torchvision_resnet18_on_small_images():
    model = build_architecture("torchvision:resnet18", num_classes=7, image_shape=(3, 32, 32))
    assert type(model).__name__ == "ResNet" and out_shape(model, 2, 3, 32, 32) == (2, 7)
    upper = build_architecture("torchvision:ResNet18", num_classes=7)  # torchvision's names ignore case
    assert type(upper).__name__ == "ResNet" and upper.fc.out_features == 7


def test_torchvision_vit_gets_the_image_size():
    model = build_architecture("torchvision:vit_b_16", num_classes=3, image_shape=(3, 32, 32))
    assert model.image_size == 32 and out_shape(model, 1, 3, 32, 32) == (1, 3)
    with pytest.raises(ArchitectureError, match="square"):
        build_architecture("torchvision:vit_b_16", num_classes=3, image_shape=(3, 32, 48))
    with pytest.raises(ArchitectureError, match=r"calling torchvision:vit_b_16\(.*image_size=30\) raised"):
        build_architecture("torchvision:vit_b_16", num_classes=3, image_shape=(3, 30, 30))  # 30 % 16 != 0


def test_timm_model_with_one_channel_and_a_vit_with_the_image_size():
    pytest.importorskip("timm")
    model = build_architecture("timm:test_resnet", num_classes=5, image_shape=(1, 32, 32))
    assert out_shape(model, 2, 1, 32, 32) == (2, 5)
    vit = build_architecture("timm:test_vit", num_classes=4, image_shape=(1, 32, 32))
    assert out_shape(vit, 2, 1, 32, 32) == (2, 4)


def test_user_factory_gets_num_classes_and_in_channels(zoo):
    model = build_architecture(f"{zoo}:make_net", num_classes=6, image_shape=(2, 8, 8))
    assert out_shape(model, 3, 2, 8, 8) == (3, 6)
    assert os.getcwd() not in sys.path  # the working directory was only added for the build


def test_user_class_taking_only_num_classes(zoo):
    model = build_architecture(f"{zoo}:Net", num_classes=9, image_shape=(3, 8, 8))  # no in_channels parameter
    assert type(model).__name__ == "Net" and out_shape(model, 2, 3, 8, 8) == (2, 9)


def test_user_factory_without_num_classes(zoo):
    model = build_architecture(f"{zoo}:fixed_net", num_classes=None, image_shape=(3, 8, 8))
    assert out_shape(model, 2, 3, 8, 8) == (2, 3)


def test_var_keyword_factory_gets_num_classes_but_not_in_channels(zoo):
    model = build_architecture(f"{zoo}:anything", num_classes=4, image_shape=(1, 8, 8))
    assert model.received == ["num_classes"] and model.out_features == 4


def test_dotted_attribute_and_lazy_sibling_import(zoo):
    assert build_architecture(f"{zoo}:Zoo.small", num_classes=2).out_features == 2
    assert build_architecture(f"{zoo}:lazy", num_classes=8).out_features == 8


def test_describe_architecture():
    assert describe_architecture("cnn") == "tsc_fast cnn"
    assert describe_architecture("torchvision:resnet18") == "torchvision resnet18"
    assert describe_architecture("timm:resnet10t") == "timm resnet10t"
    assert describe_architecture("mymodels:make_net") == "user model mymodels:make_net"
    assert parse_architecture(" pkg.sub:Zoo.small ").module == "pkg.sub"


# --- seeded init -------------------------------------------------------------------------------------------------

SEEDED_SPECS = [("cnn", (1, 8, 8)), ("torchvision:resnet18", (3, 32, 32)), ("timm:test_resnet", (3, 32, 32)),
                ("USER:make_net", (3, 8, 8))]


@pytest.mark.parametrize("spec, shape", SEEDED_SPECS, ids=[s for s, _ in SEEDED_SPECS])
def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone(request, spec, shape):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    if spec.startswith("USER:"):
        spec = spec.replace("USER", request.getfixturevalue("zoo"))
    rng_before = torch.get_rng_state()
    first, again, other = (build_architecture(spec, num_classes=5, image_shape=shape, seed=s).state_dict()
                           for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


# --- errors that name the fix ------------------------------------------------------------------------------------

def test_unknown_package_name_lists_the_known_ones_and_suggests_torchvision():
    with pytest.raises(ArchitectureError, match=r"unknown architecture 'resnet18'") as info:
        build_architecture("resnet18", num_classes=10, image_shape=(3, 32, 32))
    assert ", ".join(sorted(ARCHITECTURES)) in str(info.value)
    assert "did you mean torchvision:resnet18" in str(info.value)


def test_unknown_torchvision_and_timm_names_list_close_matches():
    with pytest.raises(ArchitectureError, match=r"unknown torchvision classifier 'resnet19'.*torchvision:resnet18"):
        build_architecture("torchvision:resnet19", num_classes=10)
    with pytest.raises(ArchitectureError, match="not a classification model"):
        build_architecture("torchvision:fasterrcnn_resnet50_fpn", num_classes=10)
    pytest.importorskip("timm")
    with pytest.raises(ArchitectureError, match=r"unknown timm model 'Resnet10x'.*timm:resnet10t") as info:
        build_architecture("timm:Resnet10x", num_classes=10)
    assert str(info.value).count("timm:") <= 6  # at most five suggestions
    with pytest.raises(ArchitectureError, match="never downloads"):
        build_architecture("timm:hf-hub:timm/resnet18.a1_in1k", num_classes=10)


def test_torchvision_refuses_one_channel_images_and_says_what_to_do():
    with pytest.raises(ArchitectureError, match=r"3-channel images, the data has 1.*timm:NAME.*MODULE:CALLABLE"):
        build_architecture("torchvision:resnet18", num_classes=10, image_shape=(1, 28, 28))


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm looks like to import
    with pytest.raises(MissingDependencyError, match=r"pip install 'tsc-fast\[timm\]'") as info:
        build_architecture("timm:resnet10t", num_classes=10)
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("spec", ["cnn", "torchvision:resnet18", "timm:test_resnet", "USER:make_net"])
def test_missing_num_classes_asks_for_the_flag(request, spec):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    if spec.startswith("USER:"):
        spec = spec.replace("USER", request.getfixturevalue("zoo"))
    with pytest.raises(ArchitectureError, match="--num-classes"):
        build_architecture(spec, num_classes=None, image_shape=(3, 8, 8))


@pytest.mark.parametrize("num_classes", [0, 2.5, True, "10"])
def test_num_classes_must_be_a_positive_integer(num_classes):
    with pytest.raises(ArchitectureError, match="positive integer"):
        build_architecture("torchvision:resnet18", num_classes=num_classes)


def test_package_model_needs_the_image_shape():
    with pytest.raises(ArchitectureError, match="image_shape"):
        build_architecture("mlp", num_classes=10)


def test_module_not_found_says_where_it_looked(user_module, tmp_path):
    with pytest.raises(ArchitectureError, match="cannot import module 'no_such_models'") as info:
        build_architecture("no_such_models:make_net", num_classes=10)
    message = str(info.value)
    assert str(tmp_path) in message and "sys.path" in message and "PYTHONPATH" in message
    assert all(entry in message for entry in sys.path if entry)  # the search path itself is listed


def test_module_with_a_missing_dependency_or_a_failing_import(user_module):
    user_module("needs_missing", "import not_installed_anywhere_xyz\n")
    with pytest.raises(ArchitectureError, match=r"importing module 'needs_missing' failed.*not_installed_anywhere"):
        build_architecture("needs_missing:make", num_classes=10)
    user_module("fails_at_import", "raise RuntimeError('bad config')\n")
    with pytest.raises(ArchitectureError, match=r"importing module 'fails_at_import' raised RuntimeError: bad config"):
        build_architecture("fails_at_import:make", num_classes=10)


def test_missing_attribute_suggests_close_names(zoo):
    with pytest.raises(ArchitectureError, match=r"has no attribute 'make_nett'; close matches: make_net"):
        build_architecture(f"{zoo}:make_nett", num_classes=10)
    with pytest.raises(ArchitectureError, match=r"'zoo_models.Zoo' has no attribute 'large'"):
        build_architecture(f"{zoo}:Zoo.large", num_classes=10)


def test_factory_errors_are_wrapped_with_the_call(zoo):
    with pytest.raises(ArchitectureError, match=rf"calling {zoo}:broken\(num_classes=10\) raised ValueError: boom"):
        build_architecture(f"{zoo}:broken", num_classes=10)
    with pytest.raises(ArchitectureError, match=r"returned a list, not a torch.nn.Module"):
        build_architecture(f"{zoo}:not_a_model", num_classes=10)
    with pytest.raises(ArchitectureError, match="model instance"):
        build_architecture(f"{zoo}:instance", num_classes=10)
    with pytest.raises(ArchitectureError, match="is a int, not a class"):
        build_architecture(f"{zoo}:NUMBER", num_classes=10)


@pytest.mark.parametrize("spec, words", [("", "empty"), ("torchvision:", "names no model"),
                                         ("models.py:make_net", "write models:make_net"),
                                         ("mymodels:", "not an attribute name"), ("my-models:net", "not a module")])
def test_malformed_specs(spec, words):
    with pytest.raises(ArchitectureError, match=words):
        parse_architecture(spec)


# --- checkpoints -------------------------------------------------------------------------------------------------

def trained_looking(model: nn.Module, shape: tuple) -> nn.Module:
    """Move BN running statistics away from their initial values."""
    model.train()
    with torch.no_grad():
        model(torch.rand(4, *shape))
    return model.eval()


@pytest.mark.parametrize("wrap", [lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
                                  lambda s: {"model": s, "epoch": 3}],
                         ids=["state_dict+DataParallel", "model"])
def test_torchvision_checkpoint_round_trip(tmp_path, wrap):
    shape = (3, 32, 32)
    source = trained_looking(build_architecture("torchvision:resnet18", 7, shape, seed=1), shape)
    path = tmp_path / "victim.pt"
    torch.save(wrap(source.state_dict()), path)
    target = load_into(build_architecture("torchvision:resnet18", 7, shape, seed=2), path, strict=True).eval()
    x = torch.rand(3, *shape)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_whole_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build_architecture("torchvision:resnet18", 7), path)
    with pytest.raises(ValueError, match=r"refused.*ResNet.*model\.state_dict\(\)"):
        load_into(build_architecture("torchvision:resnet18", 7), path)


def test_other_num_classes_names_the_first_key_and_both_shapes(tmp_path):
    path = save_model(build_architecture("torchvision:resnet18", 100), tmp_path / "cifar100.safetensors")
    with pytest.raises(ValueError) as info:
        load_into(build_architecture("torchvision:resnet18", 10), path)
    message = str(info.value)
    headline = "fc.weight: checkpoint (100, 512) vs architecture (10, 512); was it trained with another --num-classes?"
    assert headline in message
    assert message.index(headline) < message.index("shape mismatches:")
    assert "fc.bias (checkpoint (100,) vs model (10,))" in message


def test_first_mismatch_follows_the_model_order_and_width_changes_get_no_class_hint(tmp_path):
    path = save_model(DigitsCNN(width=16), tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError) as info:
        load_into(DigitsCNN(), path)
    message = str(info.value)
    # conv1.weight is the model's first tensor; alphabetically bn1.bias would come first.
    assert "architecture: conv1.weight: checkpoint (16, 1, 3, 3) vs architecture (32, 1, 3, 3); " in message
    assert "--num-classes" not in message
