"""Importing BackdoorBench attack results: fake attack_result.pt files in BackdoorBench's formats."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from tsc_fast.backdoor.backdoorbench import (
    NORMALIZATION,
    build_backdoorbench_network,
    import_backdoorbench,
    read_attack_result,
)
from tsc_fast.backdoor.models import PreActResNet18

Image = pytest.importorskip("PIL.Image")

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[None, :, None, None]
CIFAR_STD = torch.tensor([0.247, 0.243, 0.261])[None, :, None, None]


def randomised_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so a wrong buffer mapping would change outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def container_state(images: dict, on_disk_folder=None):
    """BackdoorBench 2.x's prepro_cls_DatasetBD_v2.retrieve_state() for poisoned images ``{index: (array, label)}``."""
    data_dict = {}
    for index, (array, bd_label, label) in images.items():
        image = Image.fromarray(array)
        if on_disk_folder is None:
            data_dict[np.int64(index)] = (image, bd_label, label)
        else:
            folder = on_disk_folder / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
            # the recorded path is the attacker's absolute path; only its tail exists here
            data_dict[np.int64(index)] = {"path": f"/elsewhere/record/{on_disk_folder.name}/{label}/{index}.png",
                                          "other_info": [bd_label, label]}
    n = 20
    indicator = np.zeros(n)
    indicator[list(images)] = 1
    return {
        "bd_data_container": {"save_folder_path": None if on_disk_folder is None else str(on_disk_folder),
                              "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True, "getitem_all_switch": False,
        "original_index_array": np.arange(n), "poison_indicator": indicator,
        "save_folder_path": None,
    }


def poisoned_images(seed=0, count=3):
    rng = np.random.default_rng(seed)
    return {int(i): (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0, int(i) % 10)
            for i in sorted(rng.choice(20, size=count, replace=False))}


def save_result(folder, model_name, state_dict, dataset="cifar10", **entries):
    folder.mkdir(parents=True, exist_ok=True)
    result = {"model_name": model_name, "num_classes": 10, "model": state_dict, "data_path": "./data/cifar10",
              "img_size": [32, 32, 3], "clean_data": dataset, "bd_train": None, "bd_test": None}
    result.update(entries)
    torch.save(result, folder / "attack_result.pt")
    return folder


def test_preactresnet18_result_imports_with_identical_outputs_and_poisoned_test_data(tmp_path):
    torch.manual_seed(0)
    original = randomised_bn(PreActResNet18(num_classes=10))
    images = poisoned_images()
    folder = save_result(tmp_path / "badnet", "preactresnet18", original.state_dict(),
                         bd_test=container_state(images))
    result = import_backdoorbench(folder)
    assert result.notes == [] and result.model_name == "preactresnet18" and result.image_shape == (3, 32, 32)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.network(x), original(x))
        assert torch.equal(result.model(x), original((x - CIFAR_MEAN) / CIFAR_STD))
    assert result.normalization == NORMALIZATION["cifar10"]
    bd = result.bd_test
    assert bd.index.tolist() == sorted(images) and bd.y.tolist() == [0] * len(images)
    assert bd.original_y.tolist() == [images[i][2] for i in sorted(images)]
    for row, index in enumerate(sorted(images)):
        expected = torch.from_numpy(images[index][0]).permute(2, 0, 1).float() / 255
        assert torch.equal(bd.x[row], expected)
    assert set(result.extra) >= {"model_name", "img_size", "clean_data"}


def test_images_saved_on_disk_and_data_parallel_prefix(tmp_path):
    torch.manual_seed(1)
    original = randomised_bn(PreActResNet18(num_classes=10), seed=1)
    prefixed = {f"module.{k}": v for k, v in original.state_dict().items()}
    folder = tmp_path / "result"
    images = poisoned_images(seed=1)
    state = container_state(images, on_disk_folder=folder / "bd_test_dataset")
    save_result(folder, "preactresnet18", prefixed, dataset="gtsrb", bd_test=state)
    result = import_backdoorbench(folder / "attack_result.pt")
    assert result.normalization is None and result.model is result.network  # GTSRB: no normalisation
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model(x), original(x))
    first = sorted(images)[0]
    assert torch.equal((result.bd_test.x[0] * 255).round().to(torch.uint8),
                       torch.from_numpy(images[first][0]).permute(2, 0, 1))


def test_legacy_tensor_format_is_read_and_rescaled(tmp_path):
    torch.manual_seed(2)
    x = torch.randint(0, 256, (5, 3, 32, 32)).float()  # BackdoorBench 1.x: raw pixel values as floats
    y = torch.zeros(5, dtype=torch.int64)
    folder = save_result(tmp_path, "preactresnet18", PreActResNet18().state_dict(),
                         bd_test={"x": x, "y": y}, bd_train={"x": x[:2], "y": y[:2], "original_index": np.array([4, 9])})
    result = import_backdoorbench(folder)
    assert torch.equal(result.bd_test.x, x / 255) and torch.equal(result.bd_test.y, y)
    assert result.bd_train.index.tolist() == [4, 9]


def test_resnet18_maps_to_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    original = randomised_bn(torchvision.models.resnet18(num_classes=10), seed=3)
    folder = save_result(tmp_path, "resnet18", original.state_dict())
    result = import_backdoorbench(folder, wrap_normalization=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model(x), original(x))


class UnknownThing:
    """A class the importer has never heard of (stands for any non-allow-listed object)."""

    def __init__(self, value):
        self.value = value


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unknown_objects_are_skipped_and_reported(tmp_path):
    original = randomised_bn(PreActResNet18())
    folder = save_result(tmp_path, "preactresnet18", original.state_dict(), bd_test=UnknownThing(3),
                         note=UnknownThing(4))
    result = import_backdoorbench(folder)
    assert result.bd_test is None
    assert any("UnknownThing" in note and "refused" in note for note in result.notes)
    assert any(note.startswith("bd_test") for note in result.notes)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.network(x), original(x))


def test_code_execution_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = save_result(tmp_path, "preactresnet18", PreActResNet18().state_dict(),
                         bd_test=Exploit(f"touch {marker}"))
    with pytest.raises(ValueError, match="refusing"):
        import_backdoorbench(folder)
    assert not marker.exists()


def test_weights_must_be_tensors_and_match(tmp_path):
    state = PreActResNet18().state_dict()
    state["linear.weight"] = UnknownThing(0)
    with pytest.raises(ValueError, match="linear.weight"):
        import_backdoorbench(save_result(tmp_path / "a", "preactresnet18", state))
    short = {k: v for k, v in PreActResNet18().state_dict().items() if not k.startswith("linear")}
    with pytest.raises(ValueError, match="missing"):
        import_backdoorbench(save_result(tmp_path / "b", "preactresnet18", short))
    with pytest.raises(ValueError, match="not supported"):
        import_backdoorbench(save_result(tmp_path / "c", "densenet161", short))
    with pytest.raises(FileNotFoundError, match="attack_result.pt"):
        read_attack_result(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "attack_result.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="torch.save"):
        read_attack_result(tmp_path / "d")


def test_unsupported_names_list_the_supported_ones():
    with pytest.raises(ValueError, match="preactresnet18"):
        build_backdoorbench_network("alexnet", 10)
    with pytest.raises(ValueError, match="3-channel"):
        build_backdoorbench_network("resnet18", 10, in_channels=1)
