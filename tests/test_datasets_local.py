"""Local dataset loaders: tiny CIFAR-10 / GTSRB / ImageNet-style folders built in tmp_path."""
import os
import pickle

import numpy as np
import pytest
import torch

from tsc_fast.data import load_dataset
from tsc_fast.data.local import (
    DatasetLayoutError,
    ImageFolderDataset,
    detect_layout,
    load_cifar10,
    load_gtsrb,
    load_image_folders,
    safe_unpickle,
)

Image = pytest.importorskip("PIL.Image")


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


def write_cifar_batch(path, images, labels, protocol=2):
    """A CIFAR-10 batch as the Python-2 era pickles hold it: byte-string keys, rows of R, G, B planes."""
    batch = {b"batch_label": b"tiny batch", b"labels": list(map(int, labels)),
             b"data": images.reshape(len(images), -1), b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def make_cifar(root, per_batch=3, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        write_cifar_batch(folder / name, images, labels)
        written[name] = (images, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, handle, protocol=2)
    return folder, written


def test_cifar10_batches_load_with_pixels_labels_and_classes(tmp_path):
    folder, written = make_cifar(tmp_path)
    for root in (folder, tmp_path):  # the batches folder itself or its parent
        splits = load_cifar10(root)
        x, y = splits.train_tensors()
        assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
        np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), expected)
        np.testing.assert_array_equal(y.numpy(), np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)]))
        x_test, y_test = splits.test_tensors()
        np.testing.assert_array_equal(y_test.numpy(), written["test_batch"][1])
        assert splits.num_classes == 10 and splits.image_shape == (3, 32, 32) and splits.classes[1] == "automobile"


def test_cifar10_channel_layout_matches_the_format():
    """Row layout: 1024 red values, then green, then blue; each plane row-major (checked on a hand-made row)."""
    from tsc_fast.data.local import read_cifar10_batch

    row = np.zeros(3072, dtype=np.uint8)
    row[0] = 10  # red, pixel (0, 0)
    row[1024 + 33] = 20  # green, pixel (1, 1)
    row[2048 + 1023] = 30  # blue, pixel (31, 31)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "b")
        write_cifar_batch(path, row[None], [4])
        images, labels = read_cifar10_batch(path)
    assert images[0, 0, 0, 0] == 10 and images[0, 1, 1, 1] == 20 and images[0, 2, 31, 31] == 30
    assert images.sum() == 60 and labels.tolist() == [4]


def test_cifar10_uint8_option_and_load_dataset_routes(tmp_path):
    folder, written = make_cifar(tmp_path)
    raw = load_cifar10(folder, dtype=torch.uint8)
    assert raw.train.tensors[0].dtype == torch.uint8
    np.testing.assert_array_equal(raw.test.tensors[0].numpy(), written["test_batch"][0])
    by_name = load_dataset("cifar10", root=str(tmp_path))
    by_path = load_dataset(str(folder))
    assert by_name.name == by_path.name == "cifar10"
    assert torch.equal(by_name.test.tensors[0], by_path.test.tensors[0])
    with pytest.raises(ValueError, match="root="):
        load_dataset("cifar10")


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalExploit:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_cifar_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    folder, _ = make_cifar(tmp_path)
    evil = {"system": Exploit(f"touch {marker}"), "eval": EvalExploit(), "class": Exploit}[payload]
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": evil}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar10(folder)
    assert not marker.exists()


def test_safe_unpickle_reads_numpy_arrays_of_several_dtypes(tmp_path):
    values = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.float32(2.5), "c": {1, 2},
              "d": np.array([0.5, 1.5], dtype=np.float64)}
    path = tmp_path / "p"
    for protocol in (2, 4):
        with open(path, "wb") as handle:
            pickle.dump(values, handle, protocol=protocol)
        loaded = safe_unpickle(path)
        np.testing.assert_array_equal(loaded["a"], values["a"])
        np.testing.assert_array_equal(loaded["d"], values["d"])
        assert loaded["b"] == np.float32(2.5) and loaded["c"] == {1, 2}


def test_cifar10_wrong_path_and_layout_errors_name_what_was_expected(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        load_cifar10(tmp_path / "missing")
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="data_batch_2"):
        load_cifar10(tmp_path)
    folder, _ = make_cifar(tmp_path / "other")
    write_cifar_batch(folder / "data_batch_2", np.zeros((2, 3, 16, 16), np.uint8), [1, 2])
    with pytest.raises(DatasetLayoutError, match="expected uint8"):
        load_cifar10(folder)


# --- GTSRB --------------------------------------------------------------------------------------------------------


def save_ppm(path, color, size):
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


def write_csv(path, rows):
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    lines += [f"{name};30;40;1;1;29;39;{label}" for name, label in rows]
    path.write_text("\n".join(lines) + "\n")


def make_gtsrb(root, train_folder="Final_Training", test_folder="Final_Test"):
    """Two classes with two training images each, three test images; every image a flat colour."""
    expected_train, expected_test = [], []
    for label in (0, 2):
        folder = root / train_folder / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for k in range(2):
            name = f"{k:05d}_00000.ppm"
            color = (10 * label + k, 100, 200 - k)
            save_ppm(folder / name, color, (30 + k, 40))
            rows.append((name, label))
            expected_train.append((color, label))
        write_csv(folder / f"GT-{label:05d}.csv", rows)
    test_images = root / test_folder / "Images"
    test_images.mkdir(parents=True)
    rows = []
    for k, label in enumerate((2, 0, 2)):
        name = f"{k:05d}.ppm"
        color = (5, 6 * k, 7)
        save_ppm(test_images / name, color, (50, 33))
        rows.append((name, label))
        expected_test.append((color, label))
    write_csv(test_images / "GT-final_test.csv", rows)
    return expected_train, expected_test


@pytest.mark.parametrize("names", [("Final_Training", "Final_Test"), ("Train", "Test")])
def test_gtsrb_standard_and_backdoorbench_layouts_load_resized(tmp_path, names):
    expected_train, expected_test = make_gtsrb(tmp_path, *names)
    splits = load_gtsrb(tmp_path, size=16)
    x, y = splits.train_tensors()
    assert x.shape == (4, 3, 16, 16) and splits.image_shape == (3, 16, 16) and splits.num_classes == 43
    for image, label, (color, expected_label) in zip(x, y, expected_train):
        assert int(label) == expected_label
        torch.testing.assert_close(image, torch.tensor(color, dtype=torch.float32)[:, None, None].expand(3, 16, 16) / 255)
    x_test, y_test = splits.test_tensors()
    assert y_test.tolist() == [label for _, label in expected_test] and x_test.shape == (3, 3, 16, 16)
    assert detect_layout(tmp_path) == "gtsrb"
    assert load_dataset("gtsrb", root=tmp_path, size=8).train.tensors[0].shape == (4, 3, 8, 8)


def test_gtsrb_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Final_Training"):
        load_gtsrb(tmp_path)
    make_gtsrb(tmp_path)
    (tmp_path / "Final_Test" / "Images" / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="GT-final_test.csv"):
        load_gtsrb(tmp_path)
    write_csv(tmp_path / "Final_Test" / "GT-final_test.csv", [("missing.ppm", 1)])  # next to Images/: accepted
    with pytest.raises(DatasetLayoutError, match="missing.ppm"):
        load_gtsrb(tmp_path)


# --- ImageNet-style folders ---------------------------------------------------------------------------------------


def make_image_folders(root, classes=("n01", "n02", "n03"), per_class=2):
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(np.full((20 + 10 * k, 30, 3), 40 * label + k, np.uint8)).save(folder / f"{k}.jpg", quality=100)
            (folder / "notes.txt").write_text("not an image")


def test_image_folders_are_lazy_resized_and_labelled(tmp_path):
    make_image_folders(tmp_path)
    splits = load_image_folders(tmp_path, size=12, lazy=True)
    assert isinstance(splits.train, ImageFolderDataset) and len(splits.train) == 6 and len(splits.test) == 6
    assert "read lazily" in splits.layout and "val/ (3 classes, 6 images)" in splits.layout
    assert splits.classes == ("n01", "n02", "n03") and splits.num_classes == 3 and splits.image_shape == (3, 12, 12)
    image, label = splits.train[3]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and label == 1
    assert abs(float(image.mean()) * 255 - 41) < 2  # flat colour 41 survives resize and JPEG
    x, y = splits.test_tensors()
    assert x.shape == (6, 3, 12, 12) and y.tolist() == [0, 0, 1, 1, 2, 2]
    eager = load_image_folders(tmp_path, image_size=12)  # small images: decoded into memory, same values
    assert isinstance(eager.train, torch.utils.data.TensorDataset) and "in memory" in eager.layout
    assert torch.equal(eager.test_tensors()[0], x) and torch.equal(eager.test_tensors()[1], y)
    assert detect_layout(tmp_path) == "image_folder"
    assert load_dataset("imagenet100", root=tmp_path, size=8).name == "imagenet100"
    assert load_dataset("imagenet", root=tmp_path, lazy=True).image_shape == (3, 224, 224)  # ImageNet's default
    assert load_dataset(str(tmp_path), size=8).name == "image_folder"


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="train/<class>"):
        load_image_folders(tmp_path)
    make_image_folders(tmp_path)
    (tmp_path / "val" / "n03" / "0.jpg").rename(tmp_path / "val" / "n03.jpg")
    (tmp_path / "val" / "n03" / "1.jpg").unlink()
    (tmp_path / "val" / "n03" / "notes.txt").unlink()
    (tmp_path / "val" / "n03").rmdir()
    with pytest.raises(DatasetLayoutError, match="different classes"):
        load_image_folders(tmp_path)


def test_unknown_folder_layout_and_missing_path(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetLayoutError, match="no dataset layout"):
        load_dataset(str(tmp_path / "stuff"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(str(tmp_path / "nowhere"))
