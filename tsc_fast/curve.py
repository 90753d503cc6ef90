"""Quadratic Bezier curves between two models of one architecture, and BatchNorm recalibration.

The control points live as flat buffers; the unmodified model runs on w(t) = (1-t)^2 A + 2t(1-t) M + t^2 B
through torch.func.functional_call, so no architecture is rewritten and any model works.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import distributed as ddp
from .batches import BatchAugment, batch_inputs, to_device
from .kernels.bezier import bezier_point
from .module_tools import eval_mode
from .training import ComputeOptions, LoopState, optimise

LossFn = Callable[[Callable[[torch.Tensor], torch.Tensor], Any], torch.Tensor]


def cross_entropy_loss(model: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> torch.Tensor:
    """The default task loss: cross-entropy of model(x) against y for an (x, y) batch."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """Knowledge distillation (Hinton et al., 2015): alpha * T^2 * KL(teacher || student at temperature T)
    + (1 - alpha) * cross-entropy on the labels, the teacher frozen in eval mode on the same (augmented) batch."""
    teacher.eval()

    def loss(model: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / temperature, dim=1)
        logits = model(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True, reduction="batchmean")
        return alpha * temperature ** 2 * kd + (1 - alpha) * F.cross_entropy(logits, y)

    return loss


class ParamLayout:
    """Names, shapes and offsets of a model's parameters inside one flat buffer."""

    def __init__(self, model: nn.Module):
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters: nothing to put on a curve")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]

    def check_matches(self, model: nn.Module, what: str) -> None:
        other = ParamLayout(model)
        if other.names != self.names or other.shapes != self.shapes:
            raise ValueError(f"{what} does not have the same parameters (names and shapes) as the curve's start")

    def flatten(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped like the parameters (gradients flow back into ``flat``)."""
        return {n: v.view(s) for n, v, s in zip(self.names, flat.split(self.numels), self.shapes)}


class BezierCurve(nn.Module):
    """A quadratic Bezier curve from ``start`` (t=0) to ``end`` (t=1); only the middle control point trains.

    The middle point starts at (A + B) / 2 (the straight line). Buffers (BatchNorm statistics) are not on the
    curve: training uses batch statistics, and a point taken from the curve is recalibrated on data.
    """

    def __init__(self, start: nn.Module, end: nn.Module):
        super().__init__()
        self.layout = ParamLayout(start)
        self.layout.check_matches(end, "the curve's end model")
        self.template = copy.deepcopy(start)
        for p in self.template.parameters():
            p.requires_grad_(False)
        a, b = self.layout.flatten(start), self.layout.flatten(end)
        self.register_buffer("start", a)          # flatten() made fresh tensors: no clones (memory at scale)
        self.register_buffer("end", b.to(a))
        self.middle = nn.Parameter((self.start + self.end) / 2)

    def weights(self, t: float) -> torch.Tensor:
        """The flat parameter vector w(t)."""
        return bezier_point(self.start, self.middle, self.end, float(t))

    def bind(self, weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable running the model on the given flat weights (the template's buffers)."""
        params = self.layout.unflatten(weights)
        return lambda *inputs: functional_call(self.template, params, inputs)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.bind(self.weights(t))(x)

    @torch.no_grad()
    def point(self, t: float, span: float = 0.0) -> nn.Module:
        """A plain module with the weights w(t) and a copy of the template's buffers (recalibrate them!).

        ``span`` > 0: the average of w over t' in [t - span/2, t + span/2] (clipped to [0, 1]) instead, as weight
        averaging along a trajectory does (SWA, FGE). The average of Bezier points is the Bezier combination with
        averaged Bernstein weights, computed exactly.
        """
        weights = self.weights(t) if span <= 0 else self.averaged_weights(t - span / 2, t + span / 2)
        model = copy.deepcopy(self.template)
        for p, w in zip(model.parameters(), self.layout.unflatten(weights).values()):
            p.copy_(w)
            p.requires_grad_(True)
        return model

    def averaged_weights(self, t0: float, t1: float) -> torch.Tensor:
        """The mean of w(t) over t uniform in [t0, t1] (clipped to [0, 1])."""
        t0, t1 = max(0.0, float(t0)), min(1.0, float(t1))
        if t1 - t0 < 1e-12:
            return self.weights(t0)
        width = t1 - t0
        c0 = ((1 - t0) ** 3 - (1 - t1) ** 3) / (3 * width)   # mean of (1-t)^2
        c2 = (t1 ** 3 - t0 ** 3) / (3 * width)               # mean of t^2
        return self.start * c0 + self.middle * (1.0 - c0 - c2) + self.end * c2


class _CurveObjective(nn.Module):
    """The curve's training loss as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, curve: BezierCurve, loss_fn: LossFn, l2_coeff: float):
        super().__init__()
        self.curve, self.loss_fn, self.l2_coeff = curve, loss_fn, l2_coeff

    def forward(self, batch: Any, t: float) -> torch.Tensor:
        w = self.curve.weights(t)
        loss = self.loss_fn(self.curve.bind(w), batch)
        if self.l2_coeff:
            loss = loss + 0.5 * self.l2_coeff * w.pow(2).sum()
        return loss


class _ModelObjective(nn.Module):
    """A model's task loss as a module (for DistributedDataParallel)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def train_curve(curve: BezierCurve, batches: Iterable[Any], epochs: int, *, loss_fn: LossFn | None = None,
                lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 5e-4, l2_coeff: float = 1e-4,
                t_max: int | None = None, augment: BatchAugment = BatchAugment(), seed: int = 0, device="cpu",
                desc: str = "curve", progress: bool = True, resume: LoopState | None = None,
                on_epoch_end: Callable[[LoopState], None] | None = None,
                compute: ComputeOptions = ComputeOptions(), sam_rho: float = 0.0) -> list[float]:
    """Train the middle control point: one t ~ U(0,1) per batch, loss = task loss + 0.5 * l2 * ||w(t)||^2.

    Under torch.distributed the objective runs inside DistributedDataParallel and BatchNorm layers use global
    batch statistics. ``resume``/``on_epoch_end``: see :func:`~tsc_fast.training.optimise`.
    """
    objective = ddp.wrap_for_training(_CurveObjective(curve, loss_fn or cross_entropy_loss, l2_coeff))
    curve.template.train()

    def step_loss(batch: Any, generator: torch.Generator) -> torch.Tensor:
        return objective(batch, float(torch.rand((), generator=generator)))

    with ddp.global_batch_norm(curve.template):
        return optimise([curve.middle], batches, epochs, step_loss, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, t_max=t_max, augment=augment, seed=seed,
                        device=device, desc=desc, progress=progress, resume=resume, on_epoch_end=on_epoch_end,
                        compute=compute, sam_rho=sam_rho)


def finetune_model(model: nn.Module, batches: Iterable[Any], epochs: int, *, loss_fn: LossFn | None = None,
             lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 5e-4,
             augment: BatchAugment = BatchAugment(), seed: int = 0, device="cpu", desc: str = "fine-tune",
             progress: bool = True, resume: LoopState | None = None,
             on_epoch_end: Callable[[LoopState], None] | None = None,
             compute: ComputeOptions = ComputeOptions()) -> list[float]:
    """Plain fine-tuning of all parameters (SGD, cosine), in train mode; the model is left in eval mode."""
    objective = ddp.wrap_for_training(_ModelObjective(model, loss_fn or cross_entropy_loss))
    model.train()
    with ddp.global_batch_norm(model):
        losses = optimise([p for p in model.parameters() if p.requires_grad], batches, epochs,
                          lambda batch, _: objective(batch), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, augment=augment, seed=seed, device=device,
                          desc=desc, progress=progress, resume=resume, on_epoch_end=on_epoch_end,
                          compute=compute)
    model.eval()
    return losses


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], device="cpu") -> int:
    """Recompute every BatchNorm's running statistics in one pass over ``batches``; returns the examples seen.

    Statistics are reset, then each batch is folded in with weight proportional to its size (momentum
    n_b / n_seen), so the running mean is the exact mean over all examples and the running variance the
    size-weighted mean of the batch variances. Only BatchNorm layers run in train mode; everything else (dropout)
    stays in eval mode. Under torch.distributed the batches are the ranks' shares of global batches and the
    statistics are those of the global batches. The model is left in eval mode.
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    momenta = [bn.momentum for bn in norms]
    seen = 0
    with eval_mode(model), ddp.global_batch_norm(model):
        for bn in norms:
            bn.reset_running_stats()
            bn.train()
        for batch in batches:
            x = batch_inputs(to_device(batch, device))
            n = int(ddp.global_sum(len(x)))  # under torch.distributed: the global batch
            seen += n
            for bn in norms:
                bn.momentum = n / seen
            model(x)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()
    if seen == 0:
        raise ValueError("no data to recalibrate BatchNorm statistics with")
    return seen
