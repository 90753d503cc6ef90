"""Data-parallel purification on torch.distributed (gloo on CPU, nccl on GPU); no engine of our own.

A run over W processes computes what one process computes on the same data, up to floating-point rounding:

* batches: every rank draws the same global batch of indices (same seed, reshuffled per epoch) and keeps the
  positions ``rank, rank + W, ...`` of it, so the union of the ranks' batches is the single-process batch;
* random translations are drawn for the whole global batch and each rank keeps its positions;
* losses are per-example means: a rank's loss is rescaled by ``n_rank * W / n_global`` so that DDP's gradient
  average is the gradient of the global batch mean;
* BatchNorm layers in train mode normalise with the statistics of the global batch (sums all-reduced with
  autograd, as SyncBatchNorm does on GPUs, but on any backend);
* correlation statistics are pooled sums all-reduced across ranks; assignments are solved on rank 0 and broadcast.

Outside an initialised process group every helper here is the identity, so the single-process path is unchanged.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def global_sum(value: float) -> float:
    """Sum of a Python number over all ranks (the number itself in a single process)."""
    if not is_distributed():
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total[0])


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled: use it for small things such as permutations)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...) if there is one and none is
    initialised yet: nccl when CUDA is available, gloo otherwise. Returns whether a group is active."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


# ---------------------------------------------------------------------------------------------------------------
# batches
class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` indices; this rank gets positions ``rank::world`` of each.

    Shuffled batches are drawn from ``seed + epoch`` (call ``set_epoch``), so an epoch's order depends on nothing
    but its number: the same on every rank, and the same when a run resumes from a checkpoint. With one process
    this is a plain (shuffled) batch sampler.
    """

    def __init__(self, num_examples: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank_: int | None = None, world: int | None = None):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"need examples and a positive batch size, got {num_examples} and {batch_size}")
        self.num_examples, self.batch_size, self.shuffle = num_examples, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        sizes = self._global_sizes()
        smallest = sizes[-1] if sizes else 0
        if smallest < self.world:
            raise ValueError(f"a global batch of {smallest} examples cannot give each of {self.world} processes "
                             f"one (examples {num_examples}, batch size {batch_size}); change the batch size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_sizes(self) -> list[int]:
        full, rest = divmod(self.num_examples, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_examples)
        start = 0
        for size in self._global_sizes():
            yield order[start:start + size][self.rank::self.world].tolist()
            start += size

    def __len__(self) -> int:
        return len(self._global_sizes())


def set_epoch(batches: Any, epoch: int) -> None:
    """Tell a loader's (batch) sampler which epoch starts, if it wants to know (ours, DistributedSampler)."""
    for sampler in (getattr(batches, "batch_sampler", None), getattr(batches, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------------------------
# training
def wrap_for_training(module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel when a process group is active (gradients averaged), else as is."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, forward_sync_buffers=False)  # buffers agree: BN is global


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of each rank's x is the sum over ranks of the gradients of y (every
    rank's loss depends on every rank's x through y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all ranks (``x`` itself in a single process)."""
    return _SumOverRanks.apply(x) if is_distributed() else x


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode batch normalisation with the statistics of all ranks' samples (autograd flows across ranks)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = global_sum(x.numel() // max(x.shape[1], 1))
    mean = all_reduce_sum(x.sum(dims)) / count
    centred = x - mean.view(shape)
    var = all_reduce_sum((centred * centred).sum(dims)) / count
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var.detach() * (count / max(count - 1, 1))
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return out


_GLOBAL_CLASSES: dict[type, type] = {}


def _global_class(cls: type) -> type:
    """A subclass of a BatchNorm class whose train-mode forward uses global batch statistics."""
    if cls not in _GLOBAL_CLASSES:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and is_distributed():
                return _global_batch_norm(self, x)
            return cls.forward(self, x)

        _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (cls,), {"forward": forward})
    return _GLOBAL_CLASSES[cls]


@contextlib.contextmanager
def global_batch_norm(model: nn.Module):
    """Within the block, the model's BatchNorm layers normalise train-mode batches with global statistics.

    The layers keep their parameters and buffers (only their class is swapped, and restored on exit); a no-op in
    a single process.
    """
    if not is_distributed():
        yield model
        return
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module, cls in swapped:
        module.__class__ = _global_class(cls)
    try:
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def loss_scale(local_examples: int, global_examples: float) -> float:
    """Factor that turns a rank's mean loss into its share of the global mean under DDP's gradient average."""
    return local_examples * world_size() / global_examples if global_examples else 1.0


def batch_size_of(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0]) if torch.is_tensor(first) and first.dim() else 1


def shard_of(batch: Any) -> tuple[int, int, int] | None:
    """``(rank, world, global batch size)`` of a rank's share of a global batch; None outside torch.distributed.

    Random augmentation draws for the whole global batch and takes this shard's draws, so that the same images
    move the same way however the batch is split across processes.
    """
    if not is_distributed():
        return None
    return rank(), world_size(), int(global_sum(batch_size_of(batch)))


__all__ = ["ShardedBatchSampler", "all_reduce_sum", "barrier", "batch_size_of", "broadcast_object", "global_batch_norm",
           "global_sum", "init_from_environment", "is_distributed", "is_main", "loss_scale", "rank", "set_epoch",
           "shard_of", "world_size", "wrap_for_training"]
