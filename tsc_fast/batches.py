"""Batches of clean data: loaders built from a Dataset or DataLoader, device moves, light image augmentation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .distributed import ShardedBatchSampler, set_epoch, shard_of


def dataset_size(data: Dataset | DataLoader) -> int:
    """Number of examples behind a Dataset or DataLoader (ValueError when it has no length)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("clean_data must have a length (a map-style Dataset, or a DataLoader over one)") from None


def make_loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> Iterable[Any]:
    """A loader over ``data``. A user's DataLoader is used as given (its batching and sampling are respected).

    Datasets are batched by :class:`~tsc_fast.distributed.ShardedBatchSampler`: each epoch's order follows from
    ``seed`` and the epoch number alone (resumable), and under torch.distributed each process gets its share of
    every global batch.
    """
    if isinstance(data, DataLoader):
        return data
    sampler = ShardedBatchSampler(dataset_size(data), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(data, batch_sampler=sampler)


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


def image_size_of(x: Any) -> int | None:
    """The side of an (N, C, H, W) image batch (its width), None for anything else."""
    return int(x.shape[-1]) if torch.is_tensor(x) and x.dim() == 4 else None


def default_shift(image_size: int) -> int:
    """Translation in pixels equivalent to the official RandomCrop(32, padding=4), scaled to the image size."""
    return max(1, round(image_size * 4 / 32))


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                     shard: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Shift each image of an (N, C, H, W) batch by up to ``max_shift`` pixels in each direction, zero fill.

    Equivalent to RandomCrop(size, padding=max_shift) applied per image, but as one batched gather.
    ``shard=(rank, world, global_n)``: ``x`` holds positions ``rank::world`` of a global batch of ``global_n``;
    shifts are drawn for the whole global batch and this shard's are used (the same images move the same way
    however the batch is split).
    """
    if max_shift <= 0 or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    span = 2 * max_shift + 1
    rank, world, total = shard if shard is not None else (0, 1, n)
    dy = torch.randint(0, span, (total,), generator=generator)[rank::world].to(x.device)
    dx = torch.randint(0, span, (total,), generator=generator)[rank::world].to(x.device)
    if len(dy) != n:
        raise ValueError(f"shard {shard} selects {len(dy)} of the global batch's shifts for {n} images")
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None,
                 shard: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Mirror each image of an (N, C, H, W) batch left-right with probability 1/2 (RandomHorizontalFlip).

    ``shard``: as for :func:`random_translate` (draws for the global batch, this shard's used).
    """
    if x.dim() != 4:
        return x
    rank, world, total = shard if shard is not None else (0, 1, x.shape[0])
    flip = (torch.rand(total, generator=generator) < 0.5)[rank::world].to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_rotate_scale(x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator | None = None,
                        shard: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Rotate each image of an (N, C, H, W) batch by U(-degrees, degrees) and rescale it by U(1-scale, 1+scale)
    about its centre (bilinear, zero fill): more views of a small clean set. ``shard`` as for random_translate."""
    if x.dim() != 4:
        return x
    rank, world, total = shard if shard is not None else (0, 1, x.shape[0])
    angle = ((torch.rand(total, generator=generator) * 2 - 1) * math.radians(degrees))[rank::world]
    zoom = (1 + (torch.rand(total, generator=generator) * 2 - 1) * scale)[rank::world]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class BatchAugment:
    """The random augmentation of curve and fine-tune batches: RandomCrop(padding=shift) as a zero-filled
    translation of up to ``shift`` pixels, then (``flip``) RandomHorizontalFlip, then (``rotation`` degrees,
    ``scale``) a random rotation and rescaling about the centre. The default does nothing."""

    shift: int = 0
    flip: bool = False
    rotation: float = 0.0
    scale: float = 0.0

    def __call__(self, batch: Any, generator: torch.Generator | None = None,
                 shard: tuple[int, int, int] | None = None) -> Any:
        """Augment the images of an (x, y, ...) batch; anything that is not a float image batch passes through."""
        if (self.shift <= 0 and not self.flip and not self.rotation and not self.scale) or \
                not isinstance(batch, (list, tuple)) or not batch:
            return batch
        x = batch[0]
        if not (torch.is_tensor(x) and x.dim() == 4 and x.is_floating_point()):
            return batch
        x = random_translate(x, self.shift, generator, shard)
        if self.flip:  # drawn after the shifts: a run without flips keeps its random stream
            x = random_hflip(x, generator, shard)
        if self.rotation or self.scale:
            x = random_rotate_scale(x, self.rotation, self.scale, generator, shard)
        return type(batch)([x, *batch[1:]])


class AugmentedBatches:
    """Batches of ``batches`` passed through ``augment``, with draws from a generator seeded by ``seed`` and the
    pass number (``set_epoch``), so every pass is reproducible (and a resumed run draws the same)."""

    def __init__(self, batches: Iterable[Any], augment: BatchAugment, seed: int):
        self.batches, self.augment, self.seed, self.epoch = batches, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch(self.batches, epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for batch in self.batches:
            yield self.augment(batch, generator, shard_of(batch))

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def to_tensors(data: Dataset | tuple[torch.Tensor, torch.Tensor], max_items: int = 200_000
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a small dataset into ``(x, y)`` tensors; refuses datasets larger than ``max_items``.

    A ``TensorDataset`` of (x, y) and an ``(x, y)`` pair are returned without copying.
    """
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"expected an (x, y) pair, got a tuple of {len(data)} items")
        return data
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (x, y), got {len(data.tensors)} tensors")
        return data.tensors[0], data.tensors[1]
    n = len(data)
    if n > max_items:
        raise ValueError(f"dataset has {n} items, more than max_items={max_items}; iterate it with a DataLoader")
    if n == 0:
        raise ValueError("cannot stack an empty dataset")
    samples = [data[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(s[0]) for s in samples])
    y = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return x, y
