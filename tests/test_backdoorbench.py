"""BackdoorBench records: fake attack_result.pt files in its 1.x and 2.x formats, laid out as its repository is
(``<root>/record/<name>/``, ``<root>/data/cifar10/``), and the defender's side (clean data, subset, metrics,
defense_result.pt)."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from tsc_fast.data import backdoorbench_defense as defense
from tsc_fast.data.backdoorbench import (
    ARCHITECTURES,
    NORMALIZATION,
    ResizeTo,
    build_backdoorbench_network,
    import_backdoorbench,
    read_attack_result,
)
from tsc_fast.data.backdoorbench_defense import (
    CleanDataNotFoundError,
    UnsupportedDatasetError,
    backdoorbench_subset_indices,
    default_defense_dir,
    evaluate_backdoorbench,
    load_defender_data,
    read_defense_result,
    save_defense_result,
)
from tsc_fast.models import PreActResNet18
from tsc_fast.normalization import NormalizedModel
from test_datasets_local import make_cifar, save_ppm, write_csv

Image = pytest.importorskip("PIL.Image")

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[None, :, None, None]
CIFAR_STD = torch.tensor([0.247, 0.243, 0.261])[None, :, None, None]
TEST_SIZE = 40  # test images per fake CIFAR split (make_cifar's per_batch)
TARGET = 0


def randomised_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so a wrong buffer mapping would change outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def container_state(images: dict, n: int = 20, png_folder=None, recorded_prefix=None, subset=True):
    """BackdoorBench 2.x's prepro_cls_DatasetBD_v2.retrieve_state() for poisoned images {index: (HWC array, bd
    label, label)}: in RAM (PIL images) or, with ``png_folder``, as PNGs whose recorded paths start with
    ``recorded_prefix`` (BackdoorBench's ``./record/<name>/bd_test_dataset``)."""
    data_dict = {}
    for index, (array, bd_label, label) in images.items():
        image = Image.fromarray(array)
        if png_folder is None:
            data_dict[np.int64(index)] = (image, bd_label, label)
        else:
            (png_folder / str(label)).mkdir(parents=True, exist_ok=True)
            image.save(png_folder / str(label) / f"{index}.png")
            data_dict[np.int64(index)] = {"path": f"{recorded_prefix}/{label}/{index}.png",
                                          "other_info": [bd_label, label]}
    indicator = np.zeros(n)  # float64, as BackdoorBench's np.zeros
    indicator[list(images)] = 1
    return {
        "bd_data_container": {"save_folder_path": None if png_folder is None else str(recorded_prefix),
                              "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True, "getitem_all_switch": False,
        # bd_test is subset to its poisoned samples; bd_train keeps every position
        "original_index_array": np.flatnonzero(indicator == 1) if subset else np.arange(n),
        "poison_indicator": indicator, "save_folder_path": None,
    }


def poisoned_images(seed=0, count=3, n=20, side=32):
    rng = np.random.default_rng(seed)
    return {int(i): (rng.integers(0, 256, (side, side, 3), dtype=np.uint8), TARGET, 1 + int(i) % 9)
            for i in sorted(rng.choice(n, size=count, replace=False))}


def save_result(folder, model_name, state_dict, dataset="cifar10", **entries):
    folder.mkdir(parents=True, exist_ok=True)
    result = {"model_name": model_name, "num_classes": 10, "model": state_dict, "data_path": "./data/cifar10",
              "img_size": (32, 32, 3), "clean_data": dataset, "bd_train": None, "bd_test": None}
    result.update(entries)
    torch.save(result, folder / "attack_result.pt")
    return folder


def as_chw_float(array):
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return randomised_bn(PreActResNet18(num_classes=10))


@pytest.fixture
def bb_repo(tmp_path, network):
    """A BackdoorBench repository root as badnet.py leaves it: data/cifar10 and record/badnet with PNGs."""
    root = tmp_path / "BackdoorBench"
    make_cifar(root / "data" / "cifar10", per_batch=TEST_SIZE)
    record = root / "record" / "badnet"
    images = poisoned_images(seed=5, count=4, n=TEST_SIZE)
    state = container_state(images, n=TEST_SIZE, png_folder=record / "bd_test_dataset",
                            recorded_prefix="./record/badnet/bd_test_dataset")
    save_result(record, "preactresnet18", network.state_dict(), bd_test=state,
                img_size=(np.int64(32), np.int64(32), np.int64(3)))
    return root, record, images


# --- importing ----------------------------------------------------------------------------------------------------


def test_preactresnet18_result_imports_with_identical_outputs_and_poisoned_test_data(tmp_path, network):
    images = poisoned_images()
    folder = save_result(tmp_path / "badnet", "preactresnet18", network.state_dict(),
                         bd_test=container_state(images))
    result = import_backdoorbench(folder)
    assert result.notes == [] and result.model_name == "preactresnet18" and result.image_shape == (3, 32, 32)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.network(x), network(x))
        assert torch.equal(result.model(x), network((x - CIFAR_MEAN) / CIFAR_STD))
    assert result.normalization == NORMALIZATION["cifar10"]
    bd = result.bd_test
    assert bd.index.tolist() == sorted(images) and bd.y.tolist() == [TARGET] * len(images)
    assert bd.original_y.tolist() == [images[i][2] for i in sorted(images)]
    for row, index in enumerate(sorted(images)):
        assert torch.equal(bd.x[row], as_chw_float(images[index][0]))
    assert bd.poison_indicator.tolist() == [i in images for i in range(20)]
    assert bd.original_index_array.tolist() == sorted(images)
    assert result.record_dir == folder.resolve() and result.data_path == "./data/cifar10"


def test_png_paths_resolve_against_the_record_folder_before_the_current_directory(bb_repo, tmp_path, monkeypatch):
    root, record, images = bb_repo
    # a decoy: the current directory holds its own ./record/badnet/ with other images at the recorded paths
    decoy_dir = tmp_path / "elsewhere"
    decoy = poisoned_images(seed=99, count=4, n=TEST_SIZE)
    for index, (_, _, label) in images.items():
        folder = decoy_dir / "record" / "badnet" / "bd_test_dataset" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(next(iter(decoy.values()))[0]).save(folder / f"{index}.png")
    monkeypatch.chdir(decoy_dir)
    result = import_backdoorbench(record)
    assert result.notes == []
    for row, index in enumerate(sorted(images)):
        assert torch.equal(result.bd_test.x[row], as_chw_float(images[index][0]))
    # a copied (renamed) record folder still finds its own images
    moved = tmp_path / "copied_record"
    record.rename(moved)
    assert torch.equal(import_backdoorbench(moved).bd_test.x[0], as_chw_float(images[sorted(images)[0]][0]))


def test_images_saved_on_disk_with_an_absolute_path_and_data_parallel_prefix(tmp_path, network):
    prefixed = {f"module.{k}": v for k, v in network.state_dict().items()}
    folder = tmp_path / "result"
    images = poisoned_images(seed=1)
    state = container_state(images, png_folder=folder / "bd_test_dataset",
                            recorded_prefix="/attacker/home/record/result/bd_test_dataset")
    save_result(folder, "preactresnet18", prefixed, dataset="gtsrb", bd_test=state)
    result = import_backdoorbench(folder / "attack_result.pt")
    assert result.normalization is None and result.model is result.network  # GTSRB: no normalisation
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model(x), network(x))
    first = sorted(images)[0]
    assert torch.equal((result.bd_test.x[0] * 255).round().to(torch.uint8),
                       torch.from_numpy(images[first][0]).permute(2, 0, 1))


def test_wrong_image_count_shape_or_missing_file_is_detected(tmp_path, network):
    images = poisoned_images(seed=2, count=3)
    short = container_state(images)
    short["poison_indicator"][[i for i in range(20) if i not in images][0]] = 1  # one more poisoned than stored
    short["original_index_array"] = np.flatnonzero(short["poison_indicator"] == 1)
    result = import_backdoorbench(save_result(tmp_path / "a", "preactresnet18", network.state_dict(),
                                              bd_test=short))
    assert result.bd_test is None and any("marks 4 samples" in n and "holds 3" in n for n in result.notes)

    small = container_state(poisoned_images(seed=3, side=28))
    result = import_backdoorbench(save_result(tmp_path / "b", "preactresnet18", network.state_dict(), bd_test=small))
    assert result.bd_test is None and any("(3, 28, 28)" in n and "img_size" in n for n in result.notes)

    folder = tmp_path / "c"
    state = container_state(images, png_folder=folder / "bd_test_dataset", recorded_prefix="./record/c/bd_test_dataset")
    gone = sorted(images)[1]
    os.remove(folder / "bd_test_dataset" / str(images[gone][2]) / f"{gone}.png")
    result = import_backdoorbench(save_result(folder, "preactresnet18", network.state_dict(), bd_test=state))
    assert result.bd_test is None and any(f"{gone}.png" in n and "not found" in n for n in result.notes)


def test_bd_train_holds_only_poisoned_samples_with_the_whole_split_described(tmp_path, network):
    images = poisoned_images(seed=4, count=2)
    state = container_state(images, subset=False)
    result = import_backdoorbench(save_result(tmp_path, "preactresnet18", network.state_dict(), bd_train=state,
                                              img_size=[32, 32, 3]))
    train = result.bd_train
    assert len(train) == 2 and train.index.tolist() == sorted(images)
    assert train.original_index_array.tolist() == list(range(20)) and int(train.poison_indicator.sum()) == 2


def test_legacy_tensor_format_is_read_and_rescaled(tmp_path, network):
    x = torch.randint(0, 256, (5, 3, 32, 32)).float()  # BackdoorBench 1.x: raw pixel values as floats
    y = torch.zeros(5, dtype=torch.int64)
    folder = save_result(tmp_path, "preactresnet18", network.state_dict(),
                         bd_test={"x": x, "y": y, "original_index": np.arange(5), "original_targets": np.arange(1, 6)},
                         bd_train={"x": x[:2], "y": y[:2], "original_index": np.array([4, 9])})
    result = import_backdoorbench(folder)
    assert torch.equal(result.bd_test.x, x / 255) and torch.equal(result.bd_test.y, y)
    assert result.bd_test.original_y.tolist() == [1, 2, 3, 4, 5]
    assert result.bd_train.index.tolist() == [4, 9]


def test_legacy_list_of_pil_images_and_bd_train_none(tmp_path, network):
    images = poisoned_images(seed=6, count=3)
    pil = [Image.fromarray(images[i][0]) for i in sorted(images)]
    order = sorted(images)
    folder = save_result(tmp_path, "preactresnet18", network.state_dict(),
                         bd_test={"x": pil, "y": np.zeros(3, dtype=np.int64), "original_index": np.array(order),
                                  "original_targets": np.array([images[i][2] for i in order])},
                         bd_train={"x": None, "y": None, "original_index": None})
    result = import_backdoorbench(folder)
    assert result.bd_train is None and result.notes == []
    assert torch.equal(result.bd_test.x[2], as_chw_float(images[sorted(images)[2]][0]))
    bad = save_result(tmp_path / "bad", "preactresnet18", network.state_dict(),
                      bd_test={"x": pil, "y": np.zeros(2, dtype=np.int64)})
    assert any("different lengths" in note for note in import_backdoorbench(bad).notes)


def test_resnet18_maps_to_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    original = randomised_bn(torchvision.models.resnet18(num_classes=10), seed=3)
    folder = save_result(tmp_path, "resnet18", original.state_dict())
    result = import_backdoorbench(folder, wrap_normalization=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model(x), original(x))
    # TSC's fork: an ImageNet resnet18 with a new fc, saved under its own (case-kept) name
    fork = import_backdoorbench(save_result(tmp_path / "fork", "pretrained-resnet18", original.state_dict()))
    assert fork.model_name == "pretrained-resnet18" and torch.equal(fork.network(x), original(x))


def test_vit_is_built_as_backdoorbench_wraps_it():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        # generate_cls_model: vit_b_16(pretrained=True), heads.head replaced, then Sequential(Resize((224, 224)), vit)
        vit = torchvision.models.vit_b_16()
        vit.heads.head = nn.Linear(vit.heads.head.in_features, 7)
        theirs = nn.Sequential(torchvision.transforms.Resize((224, 224)), vit).state_dict()
        ours = build_backdoorbench_network("vit_b_16", 7).state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert next(iter(ours)).startswith("1.")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ResizeTo((224, 224))(x), torchvision.transforms.Resize((224, 224))(x))


def test_keys_renamed_by_position_like_backdoorbench_but_shapes_must_match(tmp_path, network):
    renamed = {f"w{i}": v for i, v in enumerate(network.state_dict().values())}
    result = import_backdoorbench(save_result(tmp_path / "a", "preactresnet18", renamed))
    assert any("renamed by position" in note for note in result.notes)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.network(x), network(x))
    wrong = dict(network.state_dict())
    wrong["linear.weight"] = torch.zeros(10, 256)
    with pytest.raises(ValueError, match="other shapes"):
        import_backdoorbench(save_result(tmp_path / "b", "preactresnet18", wrong))


class UnknownThing:
    """A class the importer has never heard of (stands for any non-allow-listed object)."""

    def __init__(self, value):
        self.value = value


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unknown_objects_are_skipped_and_reported(tmp_path, network):
    folder = save_result(tmp_path, "preactresnet18", network.state_dict(), bd_test=UnknownThing(3),
                         note=UnknownThing(4))
    result = import_backdoorbench(folder)
    assert result.bd_test is None
    assert any("UnknownThing" in note and "refused" in note for note in result.notes)
    assert any(note.startswith("bd_test") for note in result.notes)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.network(x), network(x))


def test_code_execution_payload_is_refused_anywhere_in_the_record(tmp_path):
    marker = tmp_path / "pwned"
    top = save_result(tmp_path / "a", "preactresnet18", PreActResNet18().state_dict(),
                      bd_test=Exploit(f"touch {marker}"))
    nested = container_state(poisoned_images())
    first = next(iter(nested["bd_data_container"]["data_dict"]))
    nested["bd_data_container"]["data_dict"][first] = (Exploit(f"touch {marker}"), 0, 1)
    inside = save_result(tmp_path / "b", "preactresnet18", PreActResNet18().state_dict(), bd_test=nested)
    for folder in (top, inside):
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
        import_backdoorbench(save_result(tmp_path / "c", "senet18", short))
    with pytest.raises(FileNotFoundError, match="attack_result.pt"):
        read_attack_result(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "attack_result.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="torch.save"):
        read_attack_result(tmp_path / "d")


def test_unknown_model_names_list_the_supported_ones():
    for name in ("googlenet", "resnext29", "alexnet_v2"):
        with pytest.raises(ValueError, match="supported: preactresnet18, resnet18, .*vgg19_bn.*vit_b_16"):
            build_backdoorbench_network(name, 10)
    with pytest.raises(ValueError, match="3-channel"):
        build_backdoorbench_network("resnet18", 10, in_channels=1)
    assert {"resnet34", "resnet50", "vgg11", "mobilenet_v3_large", "efficientnet_b3", "densenet161",
            "convnext_tiny", "vit_b_16"} <= set(ARCHITECTURES)


# --- the defender's data ------------------------------------------------------------------------------------------


def test_clean_data_found_from_the_record_location_and_subset_is_backdoorbench_choice(bb_repo, tmp_path,
                                                                                      monkeypatch):
    root, record, images = bb_repo
    monkeypatch.chdir(tmp_path)  # not BackdoorBench's root: the data are found from the record's path
    result = import_backdoorbench(record)
    data = load_defender_data(result)
    assert data.data_folder == root.resolve() / "data" / "cifar10" and data.train_size == 5 * TEST_SIZE
    x, y = data.clean_train
    assert len(x) == int(200 * 0.05) == 10 and x.dtype == torch.float32 and float(x.max()) <= 1.0
    random.seed(0)  # what fix_random(0) + choose_index do in BackdoorBench's defenses
    assert data.subset_index.tolist() == random.sample(range(200), int(200 * 0.05))
    assert load_defender_data(result).subset_index.tolist() == data.subset_index.tolist()  # reproducible
    assert load_defender_data(result, seed=1).subset_index.tolist() != data.subset_index.tolist()
    assert len(load_defender_data(result, ratio=0.1).subset_index) == 20
    full = defense.load_record_dataset(result)[0].train.tensors
    assert torch.equal(x, full[0][torch.from_numpy(data.subset_index)].float() / 255)
    assert torch.equal(y, full[1][torch.from_numpy(data.subset_index)])
    assert data.clean_test[0].shape == (TEST_SIZE, 3, 32, 32) and len(data.bd_test) == len(images)
    index_file = tmp_path / "index.txt"
    np.savetxt(index_file, [3, 1, 4], fmt="%d")  # a BackdoorBench defense's log/index.txt
    assert load_defender_data(result, index_file=index_file).subset_index.tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match="leaves none"):
        backdoorbench_subset_indices(10, 0.05)


def test_data_dir_forms_and_the_missing_data_error(bb_repo, tmp_path):
    root, record, _ = bb_repo
    result = import_backdoorbench(record)
    dataset = root / "data" / "cifar10"
    for data_dir in (root / "data", root, dataset, dataset / "cifar-10-batches-py"):
        assert defense.find_clean_data(result, data_dir).resolve() in (dataset, dataset / "cifar-10-batches-py")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CleanDataNotFoundError, match=r"--data-dir") as error:
        load_defender_data(result, data_root=empty)
    assert str(empty / "cifar10") in str(error.value) and str(empty) in str(error.value)
    moved = tmp_path / "lonely" / "badnet"
    moved.parent.mkdir()
    record.rename(moved)  # no BackdoorBench root above it, cwd without data
    with pytest.raises(CleanDataNotFoundError, match="data/cifar10"):
        load_defender_data(import_backdoorbench(moved))
    other = save_result(tmp_path / "tiny", "preactresnet18", PreActResNet18().state_dict(), dataset="tiny")
    with pytest.raises(UnsupportedDatasetError, match="cifar10, cifar100, gtsrb"):
        load_defender_data(import_backdoorbench(other), data_root=empty)


def test_record_and_data_that_disagree_are_refused(bb_repo, tmp_path, network):
    root, _, _ = bb_repo
    images = poisoned_images(seed=7, count=2, n=TEST_SIZE + 5)
    record = save_result(root / "record" / "other", "preactresnet18", network.state_dict(),
                         bd_test=container_state(images, n=TEST_SIZE + 5))
    with pytest.raises(ValueError, match="not the dataset the attack used"):
        load_defender_data(import_backdoorbench(record))


def test_backdoorbench_gtsrb_layout_and_cifar100_files_load(tmp_path):
    gtsrb = tmp_path / "gtsrb"
    for label in (0, 1):
        folder = gtsrb / "Train" / f"{label:05d}"
        folder.mkdir(parents=True)
        save_ppm(folder / "a.ppm", (label * 50, 10, 20), (30, 40))
        write_csv(folder / f"GT-{label:05d}.csv", [("a.ppm", label)])
    (gtsrb / "Test").mkdir()
    save_ppm(gtsrb / "Test" / "t.ppm", (1, 2, 3), (50, 33))
    write_csv(gtsrb / "Test" / "GT-final_test.csv", [("t.ppm", 1)])
    splits = defense._load_backdoorbench_gtsrb(gtsrb, 16)
    assert splits.train.tensors[0].shape == (2, 3, 16, 16) and splits.train.tensors[1].tolist() == [0, 1]
    assert splits.train.tensors[0].dtype == torch.uint8 and int(splits.train.tensors[0][1, 0, 0, 0]) == 50
    cifar100 = tmp_path / "cifar100" / "cifar-100-python"
    cifar100.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        with open(cifar100 / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}, handle, protocol=2)
    splits = defense.load_cifar100(tmp_path / "cifar100")
    assert splits.num_classes == 100 and splits.train.tensors[1].tolist() == list(range(90, 96))


def test_metrics_follow_backdoorbench_definitions():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    clean = (torch.rand(8, 3, 4, 4), torch.tensor([3, 3, 1, 2, 3, 0, 0, 0]))
    bd = defense.PoisonedSplit(torch.rand(5, 3, 4, 4), torch.tensor([3, 3, 3, 3, 3]), torch.tensor([1, 3, 2, 3, 0]))
    metrics = evaluate_backdoorbench(Constant(), clean, bd)
    # ACC 3/8; ASR and RA over the 3 samples whose label the attack changed: all predicted 3 (the target)
    assert metrics == {"acc": 37.5, "asr": 100.0, "ra": 0.0}
    assert np.isnan(evaluate_backdoorbench(Constant(), clean, None)["asr"])


# --- defense_result.pt --------------------------------------------------------------------------------------------


def test_defense_result_round_trip_loads_strictly_into_backdoorbench_network(bb_repo, network):
    _, record, _ = bb_repo
    result = import_backdoorbench(record)
    purified = nn.DataParallel(NormalizedModel(randomised_bn(PreActResNet18(), seed=8), *NORMALIZATION["cifar10"]))
    file = save_defense_result(default_defense_dir(record), purified, "preactresnet18", 10)
    assert file == record / "defense" / "tsc_fast" / "defense_result.pt"
    assert sorted(os.listdir(file.parent)) == ["defense_result.pt"]  # no temporary file left
    saved = torch.load(file, weights_only=True)  # what analysis/visual_metric.py gets
    assert set(saved) == {"model_name", "num_classes", "model"}
    assert saved["model_name"] == "preactresnet18" and saved["num_classes"] == 10
    assert all(type(v) is torch.Tensor for v in saved["model"].values())
    fresh = build_backdoorbench_network(saved["model_name"], saved["num_classes"])
    fresh.load_state_dict(saved["model"], strict=True)
    fresh.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), purified.module.network(x))
        assert not torch.equal(fresh(x), result.network(x))
    assert read_defense_result(file.parent)["model_name"] == "preactresnet18"


def test_defense_result_is_checked_and_written_atomically(tmp_path, network, monkeypatch):
    folder = tmp_path / "defense" / "tsc_fast"
    with pytest.raises(ValueError, match="not BackdoorBench's vgg19_bn"):
        save_defense_result(folder, network, "vgg19_bn", 10)
    assert not (folder / "defense_result.pt").exists()
    first = save_defense_result(folder, network, "preactresnet18", 10)
    before = first.read_bytes()

    def dies_half_way(obj, stream):
        stream.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(defense.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_defense_result(folder, randomised_bn(PreActResNet18(), seed=9), "preactresnet18", 10)
    assert os.listdir(folder) == ["defense_result.pt"] and first.read_bytes() == before
