"""Batches of clean data: loaders built from a Dataset or DataLoader, device moves, light image augmentation."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def dataset_size(data: Dataset | DataLoader) -> int:
    """Number of examples behind a Dataset or DataLoader (ValueError when it has no length)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("clean_data must have a length (a map-style Dataset, or a DataLoader over one)") from None


def make_loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> Iterable[Any]:
    """A loader over ``data``. A user's DataLoader is used as given (its batching and sampling are respected)."""
    if isinstance(data, DataLoader):
        return data
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the first element of an (x, y, ...) tuple, else the batch itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def default_shift(image_size: int) -> int:
    """Translation in pixels equivalent to the official RandomCrop(32, padding=4), scaled to the image size."""
    return max(1, round(image_size * 4 / 32))


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of an (N, C, H, W) batch by up to ``max_shift`` pixels in each direction, zero fill.

    Equivalent to RandomCrop(size, padding=max_shift) applied per image, but as one batched gather.
    """
    if max_shift <= 0 or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    span = 2 * max_shift + 1
    dy = torch.randint(0, span, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, span, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def augment_batch(batch: Any, max_shift: int, generator: torch.Generator | None = None) -> Any:
    """Randomly translate the images of an (x, y, ...) batch; anything that is not an image batch passes through."""
    if max_shift <= 0 or not isinstance(batch, (list, tuple)) or not batch:
        return batch
    x = batch[0]
    if not (torch.is_tensor(x) and x.dim() == 4 and x.is_floating_point()):
        return batch
    return type(batch)([random_translate(x, max_shift, generator), *batch[1:]])


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)
