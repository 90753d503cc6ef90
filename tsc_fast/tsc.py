"""The TSC algorithm: configuration, the two-stage rounds, and what a run reports."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .align import realign, unalign
from .batches import batch_inputs, dataset_size, default_shift, make_loader, steps_per_epoch
from .curve import BezierCurve, LossFn, finetune, recalibrate_bn, train_curve
from .spec import PermutationSpec, discover

OFFICIAL_CURVE_STEPS = 2000  # the official regime: 2500 images, batch 256, 200 epochs -> about 2000 steps


def adaptive_batch_size(num_examples: int) -> int:
    """Curve/fine-tune batch size for a clean set of this size.

    The official 256 when the set is large; for small sets, a power of two leaving at least about five optimiser
    steps per epoch, never below 16 (CALIBRATION.md: with fewer images than one batch an epoch is a single step
    and the curve barely leaves the straight line; batch 16 fixed it on digits), and never above the set size.
    """
    size = 2 ** max(0, math.floor(math.log2(max(num_examples / 5, 1))))
    return max(1, min(num_examples, max(16, min(256, size))))


@dataclass
class TSCConfig:
    """Settings of a TSC run. ``TSCConfig()`` adapts to the clean set; ``TSCConfig.official()`` reproduces the
    official code. Every field is documented; ``None`` means "derive it from the data" (see ``plan``).
    """

    rounds: int = 3                       # E: rounds of (stage 1, stage 2); official 3
    t_stage1: float = 0.4                 # t* of the curve original -> un-aligned copy; official 0.4
    t_stage2: float = 0.4                 # t* of the curve re-aligned original -> stage-1 point; official 0.4
    curve_steps: int | None = OFFICIAL_CURVE_STEPS  # optimiser steps per curve (epochs derived from it) ...
    curve_epochs: int | None = None       # ... unless epochs are given (official: 200 epochs)
    batch_size: int | None = None         # curve and fine-tune batch; None: adaptive_batch_size (official 256)
    lr: float = 0.02                      # curve SGD learning rate (official)
    momentum: float = 0.9
    weight_decay: float = 5e-4            # SGD weight decay on the middle control point (official)
    l2_coeff: float = 1e-4                # curve loss adds 0.5 * l2_coeff * ||w(t)||^2 (official)
    cosine_t_max: int | None = None       # cosine period in epochs; None: the number of epochs (official quirk: 100)
    finetune_epochs: int = 10             # between rounds, not after the last (official)
    finetune_lr: float = 1e-4
    stats_batch_size: int = 128           # batches for correlation statistics and BN recalibration (official 128)
    augment_shift: int | None = None      # random translation (pixels) of curve/fine-tune images; None: 4 px at
                                          # 32 px scaled to the image size (official RandomCrop(padding=4)); 0: off
    objective: str = "correlation"        # "correlation" (Pearson) or "second_moment" (uncentred, L2 objective)
    assign_backend: str = "auto"          # LAP backend: auto/native, scipy, lap
    verify: bool = True                   # check every permutation preserves the function (cheap: one batch)
    seed: int = 0
    device: str | None = None             # None: the model's device
    progress: bool = True                 # progress bars
    warn_below_steps: int = 1000          # warn when a curve would get fewer optimiser steps than this

    @classmethod
    def official(cls, **overrides: Any) -> "TSCConfig":
        """The official implementation's settings exactly: 200 epochs at batch 256, cosine T_max 100."""
        settings = dict(curve_steps=None, curve_epochs=200, batch_size=256, cosine_t_max=100)
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan(self, num_examples: int, image_size: int | None, loader_batch_size: int | None = None) -> "RunPlan":
        """Concrete batch size, epochs and augmentation for a clean set of ``num_examples`` examples.

        ``loader_batch_size``: the batch size of a DataLoader the user handed over (it wins: it is used as given).
        """
        if num_examples <= 0:
            raise ValueError("the clean data is empty")
        batch = loader_batch_size or self.batch_size or adaptive_batch_size(num_examples)
        per_epoch = steps_per_epoch(num_examples, batch)
        if self.curve_epochs is not None:
            epochs = self.curve_epochs
        elif self.curve_steps is not None:
            epochs = max(1, math.ceil(self.curve_steps / per_epoch))
        else:
            raise ValueError("set curve_steps or curve_epochs")
        shift = self.augment_shift
        if shift is None:
            shift = default_shift(image_size) if image_size else 0
        return RunPlan(batch, epochs, per_epoch * epochs, shift, self.cosine_t_max or epochs)


@dataclass(frozen=True)
class RunPlan:
    batch_size: int
    curve_epochs: int
    curve_steps: int
    augment_shift: int
    cosine_t_max: int


@dataclass
class TSCResult:
    model: nn.Module                                   # the purified model, a plain nn.Module in eval mode
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per round and stage
    spec: PermutationSpec | None = None
    plan: RunPlan | None = None
    seconds: float = 0.0


def _image_size(x: Any) -> int | None:
    return int(x.shape[-1]) if torch.is_tensor(x) and x.dim() == 4 else None


def _model_device(model: nn.Module, requested: str | None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def purify(model: nn.Module, clean_data: Dataset | DataLoader, loss_fn: LossFn | None = None,
           config: TSCConfig | None = None, spec: PermutationSpec | None = None) -> TSCResult:
    """Remove a backdoor from ``model`` with TSC, using only ``clean_data``; the input model is not modified.

    ``clean_data``: a Dataset of (x, y) or a DataLoader (used as given for every phase). ``loss_fn(model, batch)``
    replaces cross-entropy (for example a contrastive loss for self-supervised encoders). ``spec``: a permutation
    spec to use instead of discovering one.
    """
    config = config or TSCConfig()
    started = time.perf_counter()
    device = _model_device(model, config.device)
    num_examples = dataset_size(clean_data)
    stats_batches = make_loader(clean_data, config.stats_batch_size, shuffle=False)
    example = batch_inputs(next(iter(stats_batches)))
    loader_batch = clean_data.batch_size if isinstance(clean_data, DataLoader) else None
    plan = config.plan(num_examples, _image_size(example), loader_batch)
    if plan.curve_steps < config.warn_below_steps:
        warnings.warn(f"each curve gets only {plan.curve_steps} optimiser steps ({plan.curve_epochs} epochs of "
                      f"{plan.curve_steps // plan.curve_epochs} steps); curves that short barely bend and may "
                      f"leave the backdoor in place (CALIBRATION.md). Raise curve_steps or lower batch_size.",
                      stacklevel=2)
    train_batches = make_loader(clean_data, plan.batch_size, shuffle=True, seed=config.seed)
    current = copy.deepcopy(model).to(device).eval()
    spec = spec or discover(current, example.to(device))
    result = TSCResult(model=current, spec=spec, plan=plan)

    def curve_between(start: nn.Module, end: nn.Module, t: float, round_: int, stage: int) -> tuple[nn.Module, list]:
        curve = BezierCurve(start, end).to(device)
        losses = train_curve(curve, train_batches, plan.curve_epochs, loss_fn=loss_fn, lr=config.lr,
                             momentum=config.momentum, weight_decay=config.weight_decay,
                             l2_coeff=config.l2_coeff, t_max=plan.cosine_t_max, augment_shift=plan.augment_shift,
                             seed=config.seed + 1000 * round_ + stage, device=device,
                             desc=f"round {round_ + 1}/{config.rounds} curve {stage}", progress=config.progress)
        point = curve.point(t)
        recalibrate_bn(point, stats_batches, device=device)
        return point, losses

    align_kw = dict(objective=config.objective, backend=config.assign_backend, device=device, verify=config.verify)
    for round_ in range(config.rounds):
        t0 = time.perf_counter()
        unaligned = unalign(current, spec, stats_batches, **align_kw)
        t1 = time.perf_counter()
        stage1_point, losses1 = curve_between(current, unaligned.model, config.t_stage1, round_, 1)
        t2 = time.perf_counter()
        result.history.append(_stage_record(round_, 1, config.t_stage1, losses1, unaligned.summary(),
                                            {"align": t1 - t0, "curve_and_bn": t2 - t1}))
        realigned = realign(current, stage1_point, spec, stats_batches, **align_kw)
        t3 = time.perf_counter()
        current, losses2 = curve_between(realigned.model, stage1_point, config.t_stage2, round_, 2)
        t4 = time.perf_counter()
        record = _stage_record(round_, 2, config.t_stage2, losses2, realigned.summary(),
                               {"align": t3 - t2, "curve_and_bn": t4 - t3})
        if round_ < config.rounds - 1 and config.finetune_epochs > 0:
            record["finetune_losses"] = finetune(
                current, train_batches, config.finetune_epochs, loss_fn=loss_fn, lr=config.finetune_lr,
                momentum=config.momentum, weight_decay=config.weight_decay, augment_shift=plan.augment_shift,
                seed=config.seed + 1000 * round_ + 3, device=device, desc=f"round {round_ + 1} fine-tune",
                progress=config.progress)
            record["seconds"]["finetune"] = time.perf_counter() - t4
        result.history.append(record)
    result.model = current.eval()
    result.seconds = time.perf_counter() - started
    return result


def _stage_record(round_: int, stage: int, t: float, losses: list[float], alignment: dict[str, Any],
                  seconds: dict[str, float]) -> dict[str, Any]:
    return {"round": round_ + 1, "stage": stage, "t": t, "curve_losses": losses,
            "perm_cost": {"identity": alignment["cost_identity"], "achieved": alignment["cost_achieved"]},
            "seconds": {**seconds, **{f"align_{k}": v for k, v in alignment["seconds"].items()}}}
