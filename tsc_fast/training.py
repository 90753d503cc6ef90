"""The one optimisation loop behind curve training and fine-tuning: SGD, cosine schedule, progress bar.

The loop is data-parallel when a torch.distributed group is active (see :mod:`tsc_fast.distributed`) and can stop
after any epoch and continue later from a :class:`LoopState` with the same result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed as ddp
from .batches import BatchAugment, to_device


def cosine_factor(epoch: int, t_max: int) -> float:
    """CosineAnnealingLR's factor at ``epoch`` (eta_min 0). Past t_max it rises again, as torch's does."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


@dataclass(frozen=True)
class ComputeOptions:
    """How training steps compute: bf16 autocast and channels-last image batches (speed on GPUs; the results
    then differ from float32 by bf16 rounding). The default is plain float32, contiguous."""

    autocast: str | None = None      # "bf16": forward passes under torch.autocast(dtype=torch.bfloat16)
    channels_last: bool = False      # 4-D image batches in channels-last memory format

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {self.autocast!r}")


def _channels_last(batch: Any) -> Any:
    if torch.is_tensor(batch) and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_channels_last(b) for b in batch)
    return batch


@dataclass
class LoopState:
    """Where an optimisation loop stands after a whole epoch: enough to continue it bit for bit.

    The learning-rate schedule is a function of the epoch, so ``epoch`` is the scheduler's state; the epoch's
    batch order is too (``ShardedBatchSampler``). The parameters themselves are saved by the caller.
    """

    epoch: int                          # epochs completed
    optimizer: dict[str, Any]           # torch.optim.SGD.state_dict() (momentum buffers)
    generator: torch.Tensor             # state of the loop's generator (t draws, translations)
    torch_rng: torch.Tensor             # global CPU RNG state (dropout and other module randomness)
    losses: list[float]                 # mean loss of every completed epoch


def optimise(params: Sequence[torch.Tensor], batches: Iterable[Any], epochs: int,
             step_loss: Callable[[Any, torch.Generator], torch.Tensor], *, lr: float, momentum: float = 0.9,
             weight_decay: float = 0.0, t_max: int | None = None, augment: BatchAugment = BatchAugment(),
             seed: int = 0, device: torch.device | str = "cpu", desc: str = "train", progress: bool = True,
             resume: LoopState | None = None, on_epoch_end: Callable[[LoopState], None] | None = None,
             compute: ComputeOptions = ComputeOptions(), sam_rho: float = 0.0) -> list[float]:
    """Run ``epochs`` passes of SGD over ``batches``; returns the mean loss of every epoch.

    ``step_loss(batch, generator)`` computes the mean loss of one (augmented, on-device) batch; the generator is
    the loop's seeded source of randomness (curve training draws t from it). The learning rate follows a cosine
    schedule stepped per epoch with period ``t_max`` epochs (default: ``epochs``); each batch is augmented by
    ``augment`` with draws from that generator. ``resume``: continue from a
    state that ``on_epoch_end`` was handed earlier (called after every epoch). Under torch.distributed the
    recorded losses are global batch means, and every rank raises together if a loss is not finite.
    ``compute``: bf16 autocast and channels-last batches (see :class:`ComputeOptions`). ``sam_rho`` > 0: each
    step is a sharpness-aware one (SAM, Foret et al., ICLR 2021): the gradient is taken at the weights moved by
    ``sam_rho`` along the normalised gradient, with the same batch and the same random draws.
    """
    if epochs <= 0:
        return []
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    t_max = t_max or epochs
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        torch.set_rng_state(resume.torch_rng)
        epoch_losses, start = list(resume.losses), resume.epoch
    bar = tqdm(range(start, epochs), desc=desc, disable=not progress or not ddp.is_main(), leave=False, unit="ep")
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_factor(epoch, t_max)
        ddp.set_epoch(batches, epoch)
        total, count = 0.0, 0
        for batch in batches:
            total += _step(batch, step_loss, optimizer, generator, augment, device, desc, epoch, count, compute,
                           sam_rho)
            count += 1
        epoch_losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(LoopState(epoch + 1, optimizer.state_dict(), generator.get_state(), torch.get_rng_state(),
                                   list(epoch_losses)))
    return epoch_losses


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights; the message says where."""


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one fused norm per tensor, one sync)."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    return bool(torch.stack([n.float() for n in torch._foreach_norm(floats)]).isfinite().all())


def _step(batch: Any, step_loss, optimizer: torch.optim.Optimizer, generator: torch.Generator, augment: BatchAugment,
          device, desc: str, epoch: int, step: int, compute: ComputeOptions, sam_rho: float = 0.0) -> float:
    """One SGD (or SAM) step on one batch; returns the batch's mean loss (over all ranks' examples)."""
    shard = ddp.shard_of(batch)
    local = ddp.batch_size_of(batch)
    batch = augment(to_device(batch, device), generator, shard)
    if compute.channels_last:
        batch = _channels_last(batch)
    draws = generator.get_state()  # SAM's second pass repeats this step's random draws (its t)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=compute.autocast == "bf16"):
        loss = step_loss(batch, generator)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise ValueError(f"{desc}: the loss must be a scalar tensor (0-dim; reduce it, e.g. with .mean()), got "
                         f"{shape}")
    value = ddp.global_sum(float(loss.detach()) * local) / shard[2] if shard else float(loss.detach())
    where = f"{desc}: epoch {epoch + 1}, step {step + 1}"
    if not math.isfinite(value):
        raise DivergedError(f"{where}: the loss became {value}; lower the learning rate")
    scale = ddp.loss_scale(local, shard[2]) if shard else 1.0
    optimizer.zero_grad(set_to_none=True)
    (loss * scale).backward()
    if sam_rho > 0:
        _sharpness_aware_gradient(optimizer, lambda: step_loss(batch, generator) * scale, generator, draws, sam_rho,
                                  compute, device)
    optimizer.step()
    # a NaN/inf gradient passes the loss check above: the weights it leaves must be checked too
    if not all_finite([p for group in optimizer.param_groups for p in group["params"]]):
        raise DivergedError(f"{where}: the weights became NaN/inf after the optimiser step (a non-finite "
                            "gradient); lower the learning rate")
    return value


def _sharpness_aware_gradient(optimizer: torch.optim.Optimizer, loss_again: Callable[[], torch.Tensor],
                              generator: torch.Generator, draws: torch.Tensor, rho: float, compute: ComputeOptions,
                              device) -> None:
    """Replace the gradients by those at w + rho * g / ||g|| (the ascent step of SAM), then move back to w."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else None
    if norm is None or not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return
    with torch.no_grad():
        moves = [p.grad * (rho / norm) for p in params]
        for p, e in zip(params, moves):
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    after = generator.get_state()
    generator.set_state(draws)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=compute.autocast == "bf16"):
        loss = loss_again()
    loss.backward()
    generator.set_state(after)
    with torch.no_grad():
        for p, e in zip(params, moves):
            p.sub_(e)

