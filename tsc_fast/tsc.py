"""The TSC algorithm: configuration, the two-stage rounds, and what a run reports."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import assign, checkpoint, inputs
from . import distributed as ddp
from . import validate as v
from .align import realign, unalign
from .batches import (
    AugmentedBatches,
    BatchAugment,
    batch_inputs,
    dataset_size,
    default_shift,
    image_size_of,
    make_loader,
    steps_per_epoch,
    to_tensors,
)
from .checkpoint import tensor_digest
from .curve import BezierCurve, LossFn, distillation_loss, finetune_model, recalibrate_bn, train_curve
from .module_tools import eval_mode, model_device
from .run_report import build_report, write_report
from .run_state import STEPS, RunState
from .spec import TAP_POINTS, PermutationSpec, discover, permute
from .stats import OBJECTIVES
from .training import ComputeOptions, DivergedError, LoopState, all_finite

OFFICIAL_CURVE_STEPS = 2000  # the official regime: 2500 images, batch 256, 200 epochs -> about 2000 steps
OFFICIAL_CROP_PADDING = 4    # the official training transform: RandomCrop(size, padding=4) at every image size
OFFICIAL_FLIPPED = ("cifar10",)  # datasets its training transform also flips horizontally
T_SELECTIONS = ("fixed", "holdout")
# Beyond the paper (README "Keeping accuracy"): random rotation and rescaling of the clean images in curve training give
# the middle control point more views of a small clean set; measured on the digits and MNIST, they collapse the
# backdoor along the curve, so a stage-2 t* of 0.2 (official 0.4) keeps it out and costs less accuracy
DEFAULT_ROTATION = 25.0      # degrees
DEFAULT_SCALE = 0.15         # +- fraction of the image size
DEFAULT_T_STAGE2 = 0.2


def adaptive_batch_size(num_examples: int) -> int:
    """Curve/fine-tune batch size for a clean set of this size.

    The official 256 when the set is large; for small sets, a power of two leaving at least about five optimiser
    steps per epoch, never below 16 (docs/calibration.md: with fewer images than one batch an epoch is a single step
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
    t_stage2: float = DEFAULT_T_STAGE2    # t* of the curve re-aligned original -> stage-1 point; official 0.4
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
    stats_batch_size: int = 128           # batches for correlation statistics (official 128)
    bn_batch_size: int | None = None      # batches for BN recalibration; None: stats_batch_size (official: 256,
                                          # its training loader's)
    augment_shift: int | None = None      # random translation (pixels) of curve/fine-tune images; None: 4 px at
                                          # 32 px scaled to the image size (official RandomCrop(padding=4)); 0: off
    augment_flip: bool = False            # random horizontal flips too (official: CIFAR-10 only)
    augment_rotation: float | None = None  # random rotations up to this many degrees; None: DEFAULT_ROTATION on
                                          # image data, off for a user's DataLoader (official: 0, off)
    augment_scale: float | None = None    # random rescaling by up to this fraction; None: DEFAULT_SCALE on image
                                          # data, off for a user's DataLoader (official: 0, off)
    stats_augment: bool = False           # statistics and BN recalibration on augmented, shuffled batches as the
                                          # official code does (its training loader); False: plain, in order
    tap_at: str = "activation"            # where unit features are read (spec.discover): after norm+activation,
                                          # or "layer_output" (raw layer outputs, the official code's choice)
    objective: str = "correlation"        # "correlation" (Pearson) or "second_moment" (uncentred, L2 objective)
    # beyond the paper: keeping accuracy (all off by default; see the README's measurements)
    t_select: str = "fixed"               # "holdout": stage-2 t* = the largest t of t_grid whose accuracy on a
                                          # held-out share of the clean set stays within acc_budget points of the
                                          # original model's (the held-out images are not trained on)
    holdout_fraction: float = 0.2         # share of the clean set held out for t_select="holdout"
    t_grid: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    acc_budget: float = 2.0               # percentage points of held-out accuracy the stage-2 point may lose
    average_span: float = 0.0             # each stage's point averages w(t) over [t* - span/2, t* + span/2]
    sam_rho: float = 0.0                  # > 0: sharpness-aware curve training (SAM) with this radius
    distill_epochs: int = 0               # > 0: after the last round, distil the original model's clean-input
                                          # outputs into the purified one on augmented clean batches
    distill_lr: float = 0.01
    distill_temperature: float = 4.0
    distill_alpha: float = 0.9            # weight of the distillation term (the rest: cross-entropy on labels)
    assign_backend: str = "auto"          # LAP backend: auto/native, scipy, lap
    autocast: str | None = None           # "bf16": curve and fine-tune forwards under bf16 autocast (GPU speed)
    channels_last: bool = False           # channels-last image batches in curve training and fine-tuning
    verify: bool = True                   # check every permutation preserves the function (16 samples)
    seed: int = 0
    device: str | None = None             # None: the model's device
    progress: bool = True                 # progress bars
    warn_below_steps: int = 1000          # warn when a curve would get fewer optimiser steps than this

    def __post_init__(self) -> None:
        """Every setting checked at construction: a wrong one fails here, naming itself and what it accepts."""
        v.integer("rounds", self.rounds, 1)
        v.real("t_stage1", self.t_stage1, 0.0, 1.0)
        v.real("t_stage2", self.t_stage2, 0.0, 1.0)
        v.integer("curve_steps", self.curve_steps, 1, allow_none=True)
        v.integer("curve_epochs", self.curve_epochs, 1, allow_none=True)
        if self.curve_steps is None and self.curve_epochs is None:
            raise v.SettingError("set curve_steps or curve_epochs (the curve budget), not both None")
        v.integer("batch_size", self.batch_size, 1, allow_none=True)
        v.real("lr", self.lr, 0.0, open_below=True)
        v.real("momentum", self.momentum, 0.0, 1.0, open_above=True)
        v.real("weight_decay", self.weight_decay, 0.0)
        v.real("l2_coeff", self.l2_coeff, 0.0)
        v.integer("cosine_t_max", self.cosine_t_max, 1, allow_none=True)
        v.integer("finetune_epochs", self.finetune_epochs, 0)
        v.real("finetune_lr", self.finetune_lr, 0.0, open_below=True)
        v.integer("stats_batch_size", self.stats_batch_size, 1)
        v.integer("bn_batch_size", self.bn_batch_size, 1, allow_none=True)
        v.integer("augment_shift", self.augment_shift, 0, allow_none=True)
        v.real("augment_rotation", self.augment_rotation, 0.0, 180.0, allow_none=True)
        v.real("augment_scale", self.augment_scale, 0.0, 1.0, open_above=True, allow_none=True)
        for flag in ("augment_flip", "stats_augment", "channels_last", "verify", "progress"):
            v.boolean(flag, getattr(self, flag))
        v.choice("tap_at", self.tap_at, TAP_POINTS)
        v.choice("objective", self.objective, OBJECTIVES)
        v.choice("t_select", self.t_select, T_SELECTIONS)
        v.real("holdout_fraction", self.holdout_fraction, 0.0, 1.0, open_below=True, open_above=True)
        if not isinstance(self.t_grid, (tuple, list)) or not self.t_grid:
            raise v.SettingError(f"t_grid must be a non-empty sequence of t values in [0, 1], got {self.t_grid!r}")
        self.t_grid = tuple(v.real("t_grid entry", t, 0.0, 1.0) for t in self.t_grid)
        v.real("acc_budget", self.acc_budget, 0.0, 100.0)
        v.real("average_span", self.average_span, 0.0, 1.0)
        v.real("sam_rho", self.sam_rho, 0.0)
        v.integer("distill_epochs", self.distill_epochs, 0)
        v.real("distill_lr", self.distill_lr, 0.0, open_below=True)
        v.real("distill_temperature", self.distill_temperature, 0.0, open_below=True)
        v.real("distill_alpha", self.distill_alpha, 0.0, 1.0)
        v.choice("assign_backend", self.assign_backend, assign.BACKENDS)
        v.choice("autocast", self.autocast, ("bf16",), allow_none=True)
        v.integer("seed", self.seed, 0)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise v.SettingError(f"device must be None or a torch device name ('cpu', 'cuda', 'cuda:1'), got "
                                     f"{self.device!r}") from None
        v.integer("warn_below_steps", self.warn_below_steps, 0)

    @classmethod
    def official(cls, dataset: str | None = None, **overrides: Any) -> "TSCConfig":
        """The official implementation's settings exactly (its PreAct-ResNet-18 / ResNet-18 code path).

        200 epochs at batch 256 with cosine T_max 100; both t* 0.4; RandomCrop(padding=4) at every image size,
        plus RandomHorizontalFlip for ``dataset="cifar10"`` (its transforms flip CIFAR-10 only), no rotation or
        rescaling; statistics at batch 128 and BN recalibration at batch 256 on those augmented, shuffled batches;
        features read at the raw layer outputs (``tap_at="layer_output"``). ``overrides`` replace any of them.
        """
        settings = dict(curve_steps=None, curve_epochs=200, batch_size=256, cosine_t_max=100, bn_batch_size=256,
                        t_stage1=0.4, t_stage2=0.4, augment_rotation=0.0, augment_scale=0.0,
                        augment_shift=OFFICIAL_CROP_PADDING, augment_flip=str(dataset).lower() in OFFICIAL_FLIPPED,
                        stats_augment=True, tap_at="layer_output")
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan(self, num_examples: int, image_size: int | None, loader_batch_size: int | None = None) -> "RunPlan":
        """Concrete batch size, epochs and augmentation for a clean set of ``num_examples`` examples.

        ``loader_batch_size``: the batch size of a DataLoader the user handed over. Such a loader is used as given:
        its batch size wins and nothing is added to its own transforms (no shift, no flip).
        """
        if num_examples <= 0:
            raise ValueError("the clean data is empty")
        batch = loader_batch_size or self.batch_size or adaptive_batch_size(num_examples)
        per_epoch = steps_per_epoch(num_examples, batch)
        if self.curve_epochs is not None:
            epochs = self.curve_epochs
        else:
            epochs = max(1, math.ceil(self.curve_steps / per_epoch))
        shift, flip, rotation, scale = self.augment_shift, self.augment_flip, self.augment_rotation, self.augment_scale
        if loader_batch_size is not None:
            if shift or flip or rotation or scale:
                warnings.warn("clean_data is a DataLoader, used as given: the augment_* settings are ignored "
                              "(put the augmentation in its dataset's transforms)", stacklevel=3)
            shift, flip, rotation, scale = 0, False, 0.0, 0.0
        else:
            shift = (default_shift(image_size) if image_size else 0) if shift is None else shift
            rotation = DEFAULT_ROTATION if rotation is None else rotation
            scale = DEFAULT_SCALE if scale is None else scale
        return RunPlan(batch, epochs, per_epoch * epochs, shift, self.cosine_t_max or epochs, flip,
                       self.bn_batch_size or self.stats_batch_size, rotation, scale)


@dataclass(frozen=True)
class RunPlan:
    batch_size: int
    curve_epochs: int
    curve_steps: int
    augment_shift: int
    cosine_t_max: int
    augment_flip: bool = False
    bn_batch_size: int = 128
    augment_rotation: float = 0.0
    augment_scale: float = 0.0

    @property
    def augment(self) -> BatchAugment:
        """The augmentation of curve and fine-tune batches."""
        return BatchAugment(self.augment_shift, self.augment_flip, self.augment_rotation, self.augment_scale)


@dataclass
class TSCResult:
    model: nn.Module                                   # the purified model, a plain nn.Module in eval mode
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per round and stage
    spec: PermutationSpec | None = None
    plan: RunPlan | None = None
    seconds: float = 0.0
    perms: list[dict[str, np.ndarray]] = field(default_factory=list)  # per round and stage: the alignment used
    resumed_from: str | None = None                    # the checkpoint a resumed run started from

    def report(self, before: dict | None = None, after: dict | None = None, **context: Any) -> dict[str, Any]:
        """This run as plain JSON-able data (see :func:`tsc_fast.run_report.build_report`): ``before``/``after``
        metrics in percent, per round and stage t*, curve losses, permutation costs, timings, plus ``context``."""
        return build_report(self, before, after, **context)

    def save_report(self, out_dir: str | Path, before: dict | None = None, after: dict | None = None,
                    plot: bool = True, **context: Any) -> dict[str, Path]:
        """Write ``out_dir/report.json`` and ``out_dir/report.png``; returns their paths."""
        return write_report(self.report(before, after, **context), out_dir, plot=plot)


CurveCallback = Callable[[int, int, BezierCurve, Any], None]   # (round, stage, trained curve, stats batches)
RESULT_NEUTRAL = ("progress", "device", "warn_below_steps")  # settings that do not change the result


def purify(model: nn.Module, clean_data: Dataset | DataLoader, loss_fn: LossFn | None = None,
           config: TSCConfig | None = None, spec: PermutationSpec | None = None, *,
           checkpoint_dir: str | Path | None = None, resume: bool = False,
           checkpoint_interval_s: float = 300.0, on_curve: CurveCallback | None = None) -> TSCResult:
    """Remove a backdoor from ``model`` with TSC, using only ``clean_data``; the input model is not modified.

    ``clean_data``: a Dataset of (x, y) or a DataLoader (used as given for every phase). ``loss_fn(model, batch)``
    replaces cross-entropy (for example a contrastive loss for self-supervised encoders). ``spec``: a permutation
    spec to use instead of discovering one.

    ``checkpoint_dir``: write a checkpoint after every step of every round (un-align, stage-1 curve, re-align,
    stage-2 curve, fine-tune) and, inside curves and fine-tunes, after the epoch in which
    ``checkpoint_interval_s`` seconds have passed since the last one. ``resume=True`` continues from the newest
    checkpoint there and gives the result an uninterrupted run would have given; a missing, corrupt or
    mismatched checkpoint raises :class:`~tsc_fast.checkpoint.CheckpointError` (never a silent fresh start).

    ``on_curve(round_, stage, curve, stats_batches)`` is called with every trained curve (rounds and stages
    count from 1) before its point at t* is taken: to plot the loss landscape along it, for example.

    Under torch.distributed (e.g. launched by torchrun) every rank calls ``purify`` with the same arguments; each
    uses its share of every batch (see :mod:`tsc_fast.distributed`) and all return the same model. Rank 0 writes
    the checkpoints; ``checkpoint_dir`` must be a folder every rank can read. A DataLoader passed as
    ``clean_data`` is used as given: under torch.distributed give it a DistributedSampler.
    """
    return _Run(model, clean_data, loss_fn, config or TSCConfig(), spec, checkpoint_dir, checkpoint_interval_s,
                on_curve).execute(resume)


class _Run:
    """One purification run: its data, its position among the rounds' steps, and its checkpoints."""

    def __init__(self, model, clean_data, loss_fn, config: TSCConfig, spec, checkpoint_dir, interval_s: float,
                 on_curve: CurveCallback | None = None):
        self.config, self.loss_fn, self.on_curve = config, loss_fn, on_curve
        self.started = time.perf_counter()
        inputs.check_model(model)
        inputs.check_clean_data(clean_data)
        self.device = model_device(model, config.device)
        clean_data, self.holdout = self._split_holdout(clean_data, loss_fn)
        num_examples = dataset_size(clean_data)
        if num_examples == 0:
            raise ValueError("the clean data are empty")
        self.stats_batches = make_loader(clean_data, config.stats_batch_size, shuffle=False)
        first = inputs.first_batch(self.stats_batches)
        example = batch_inputs(first)
        inputs.check_batch(model, first, example, self.device, loss_fn is None,
                           inputs.dataset_labels_if_cheap(clean_data))
        loader_batch = clean_data.batch_size if isinstance(clean_data, DataLoader) else None
        self.plan = config.plan(num_examples, image_size_of(example), loader_batch)
        if self.plan.curve_steps < config.warn_below_steps and ddp.is_main():
            warnings.warn(f"each curve gets only {self.plan.curve_steps} optimiser steps ({self.plan.curve_epochs} "
                          f"epochs of {self.plan.curve_steps // self.plan.curve_epochs} steps); curves that short "
                          f"barely bend and may leave the backdoor in place. Raise curve_steps "
                          f"or lower batch_size.", stacklevel=3)
        self.train_batches = make_loader(clean_data, self.plan.batch_size, shuffle=True, seed=config.seed)
        self.clean_data = clean_data
        self.current = copy.deepcopy(model).to(self.device).eval()
        self.teacher = self.current if config.distill_epochs > 0 else None  # the original, never trained
        self.reference_acc = self._holdout_accuracy(self.current) if self.holdout is not None else None
        if self.teacher is not None:
            self.current = copy.deepcopy(self.teacher)
        self.spec = spec or discover(self.current, example.to(self.device), tap_at=config.tap_at)
        if not self.spec.groups:
            raise ValueError(f"{type(model).__name__} has no permutation groups (no hidden units that can be "
                             "permuted without changing its function): TSC has nothing to permute. Check "
                             "print(tsc_fast.discover(model, x)) and any `exclude` you passed")
        self.state = RunState()                           # the position, and what the next step needs
        self.stage1_point: nn.Module | None = None        # between the stage-1 and the stage-2 curve
        self.result = TSCResult(model=self.current, spec=self.spec, plan=self.plan, history=self.state.history,
                                perms=self.state.perms)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.interval_s = interval_s
        self.last_save = time.perf_counter()
        self.identity = self._identity(model, num_examples, clean_data) if self.checkpoint_dir else {}
        self.compute = ComputeOptions(config.autocast, config.channels_last)

    # ------------------------------------------------------------------ the rounds
    def execute(self, resume: bool) -> TSCResult:
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs the checkpoint_dir of the interrupted run")
            self._restore()
        run = {"unalign": self._unalign, "curve1": self._curve1, "realign": self._realign, "curve2": self._curve2,
               "finetune": self._finetune, "distill": self._distill}
        while self.state.round < self.config.rounds:
            run[self.state.step]()
        self.result.model = self.current.eval()
        self.result.seconds = time.perf_counter() - self.started
        return self.result

    def _advance(self) -> None:
        """Move to the next step (fine-tune only between rounds, and only if it has epochs) and checkpoint."""
        state, c = self.state, self.config
        last_round = state.round == c.rounds - 1
        skipped = {"finetune": last_round or c.finetune_epochs <= 0, "distill": not last_round or c.distill_epochs <= 0}
        index = STEPS.index(state.step) + 1
        while index < len(STEPS) and skipped.get(STEPS[index], False):
            index += 1
        if index == len(STEPS):
            state.round, index = state.round + 1, 0
        state.step, state.middle, state.loop = STEPS[index], None, None
        self._save()  # after the last step too: resuming a finished run returns its result at once

    def _align_kw(self) -> dict[str, Any]:
        c = self.config
        return dict(objective=c.objective, backend=c.assign_backend, device=self.device, verify=c.verify)

    def _pass_batches(self, batch_size: int, purpose: int) -> Any:
        """Batches for one statistics or BN pass: the plain, ordered stats batches, or (``stats_augment``) shuffled
        and augmented ones drawn from a seed fixed by the round and the step (``purpose``), so resuming redraws
        them exactly."""
        if not self.config.stats_augment:
            return self.stats_batches if batch_size == self.config.stats_batch_size else \
                make_loader(self.clean_data, batch_size, shuffle=False)
        seed = self.config.seed + 1000 * self.state.round + 100 + purpose
        return AugmentedBatches(make_loader(self.clean_data, batch_size, shuffle=True, seed=seed), self.plan.augment,
                                seed)

    def _unalign(self) -> None:
        t0 = time.perf_counter()
        batches = self._pass_batches(self.config.stats_batch_size, STEPS.index("unalign"))
        alignment = unalign(self.current, self.spec, batches, **self._align_kw())
        self._aligned(alignment, time.perf_counter() - t0)

    def _realign(self) -> None:
        t0 = time.perf_counter()
        batches = self._pass_batches(self.config.stats_batch_size, STEPS.index("realign"))
        alignment = realign(self.current, self.stage1_point, self.spec, batches, **self._align_kw())
        self._aligned(alignment, time.perf_counter() - t0)

    def _aligned(self, alignment, seconds: float) -> None:
        self.state.perms.append(alignment.perms)  # the last one feeds the next curve
        self.state.pending = {"alignment": alignment.summary(), "seconds": {"align": seconds}}
        self._advance()

    def _curve1(self) -> None:
        unaligned = permute(self.current, self.spec, self.state.perms[-1])
        self.stage1_point = self._curve(self.current, unaligned, self.config.t_stage1, stage=1)
        self._advance()

    def _curve2(self) -> None:
        realigned = permute(self.current, self.spec, self.state.perms[-1])
        t = None if self.config.t_select == "holdout" else self.config.t_stage2  # None: chosen on the held-out share
        self.current = self._curve(realigned, self.stage1_point, t, stage=2)
        self.stage1_point = None
        self._advance()

    def _curve(self, start: nn.Module, end: nn.Module, t: float | None, stage: int) -> nn.Module:
        c, plan, state, r = self.config, self.plan, self.state, self.state.round
        t0 = time.perf_counter()
        curve = BezierCurve(start, end).to(self.device)
        if state.middle is not None:
            with torch.no_grad():
                curve.middle.copy_(state.middle)

        def save_epoch(loop: LoopState) -> None:
            state.middle, state.loop = curve.middle.detach(), loop
            self._save(interim=True)

        losses = train_curve(curve, self.train_batches, plan.curve_epochs, loss_fn=self.loss_fn, lr=c.lr,
                             momentum=c.momentum, weight_decay=c.weight_decay, l2_coeff=c.l2_coeff,
                             t_max=plan.cosine_t_max, augment=plan.augment,
                             seed=c.seed + 1000 * r + stage, device=self.device,
                             desc=f"round {r + 1}/{c.rounds} curve {stage}", progress=c.progress and ddp.is_main(),
                             resume=state.loop, on_epoch_end=save_epoch if self.checkpoint_dir else None,
                             compute=self.compute, sam_rho=c.sam_rho)
        if self.on_curve is not None:
            self.on_curve(r + 1, stage, curve, self.stats_batches)
        bn_batches = self._pass_batches(plan.bn_batch_size, STEPS.index(f"curve{stage}"))
        candidates = None
        if t is None:
            t, point, candidates = self._select_t(curve, bn_batches)
        else:
            point = curve.point(t, c.average_span)
            recalibrate_bn(point, bn_batches, device=self.device)
        _require_finite(point, f"round {r + 1}, stage {stage}: the curve point at t={t:g}")
        seconds = {**state.pending["seconds"], "curve_and_bn": time.perf_counter() - t0}
        record = _stage_record(r, stage, t, losses, state.pending["alignment"], seconds)
        if candidates is not None:
            record["t_candidates"] = candidates
        state.history.append(record)
        return point

    def _select_t(self, curve: BezierCurve, bn_batches) -> tuple[float, nn.Module, dict[str, float]]:
        """The largest t of ``t_grid`` whose point keeps its held-out accuracy within ``acc_budget`` points of the
        original model's (the point furthest from the backdoored start that the budget allows); if none does,
        the most accurate one. Returns (t, its recalibrated point, held-out accuracy per t)."""
        scored = []
        for t in sorted(self.config.t_grid):
            point = curve.point(t, self.config.average_span)
            recalibrate_bn(point, bn_batches, device=self.device)
            scored.append((t, self._holdout_accuracy(point), point))
        within = [entry for entry in scored if entry[1] >= self.reference_acc - self.config.acc_budget]
        t, _, point = within[-1] if within else max(scored, key=lambda entry: (entry[1], -entry[0]))
        return t, point, {f"{t:g}": acc for t, acc, _ in scored}

    def _finetune(self) -> None:
        c, state, r = self.config, self.state, self.state.round
        t0 = time.perf_counter()

        def save_epoch(loop: LoopState) -> None:
            state.loop = loop
            self._save(interim=True)

        record = state.history[-1]
        record["finetune_losses"] = finetune_model(
            self.current, self.train_batches, c.finetune_epochs, loss_fn=self.loss_fn, lr=c.finetune_lr,
            momentum=c.momentum, weight_decay=c.weight_decay, augment=self.plan.augment,
            seed=c.seed + 1000 * r + 3, device=self.device, desc=f"round {r + 1} fine-tune",
            progress=c.progress and ddp.is_main(), resume=state.loop,
            on_epoch_end=save_epoch if self.checkpoint_dir else None, compute=self.compute)
        record["seconds"]["finetune"] = record["seconds"].get("finetune", 0.0) + time.perf_counter() - t0
        _require_finite(self.current, f"round {r + 1}: the fine-tuned model")
        self._advance()

    def _distill(self) -> None:
        """Distil the original model's outputs on clean (augmented) inputs into the purified model."""
        c, state = self.config, self.state
        t0 = time.perf_counter()

        def save_epoch(loop: LoopState) -> None:
            state.loop = loop
            self._save(interim=True)

        record = state.history[-1]
        record["distill_losses"] = finetune_model(
            self.current, self.train_batches, c.distill_epochs,
            loss_fn=distillation_loss(self.teacher, c.distill_temperature, c.distill_alpha), lr=c.distill_lr,
            momentum=c.momentum, weight_decay=c.weight_decay, augment=self.plan.augment,
            seed=c.seed + 1000 * state.round + 4, device=self.device, desc="distill",
            progress=c.progress and ddp.is_main(), resume=state.loop,
            on_epoch_end=save_epoch if self.checkpoint_dir else None, compute=self.compute)
        record["seconds"]["distill"] = record["seconds"].get("distill", 0.0) + time.perf_counter() - t0
        _require_finite(self.current, "the distilled model")
        self._advance()

    # ------------------------------------------------------------------ held-out clean data
    def _split_holdout(self, clean_data, loss_fn) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
        """(training share, held-out (x, y)) for ``t_select="holdout"``; (clean_data, None) otherwise."""
        if self.config.t_select != "holdout":
            return clean_data, None
        if loss_fn is not None or isinstance(clean_data, DataLoader):
            raise ValueError("t_select='holdout' measures held-out accuracy: it needs a labelled Dataset of (x, y) "
                             "and the default cross-entropy loss (not a DataLoader or a custom loss_fn)")
        n = dataset_size(clean_data)
        held = max(1, round(self.config.holdout_fraction * n))
        if held >= n:
            raise ValueError(f"holdout_fraction {self.config.holdout_fraction} of {n} clean examples leaves nothing "
                             "to train on")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 7))
        held_index, kept = order[:held].tolist(), order[held:].tolist()
        x, y = to_tensors(Subset(clean_data, held_index))
        return Subset(clean_data, sorted(kept)), (x, y)

    @torch.no_grad()
    def _holdout_accuracy(self, model: nn.Module) -> float:
        x, y = self.holdout
        with eval_mode(model):
            predictions = torch.cat([model(x[i:i + 256].to(self.device)).argmax(1).cpu() for i in range(0, len(x), 256)])
        return float((predictions == y).float().mean() * 100)

    # ------------------------------------------------------------------ checkpoints
    def _identity(self, model: nn.Module, num_examples: int, clean_data) -> dict[str, Any]:
        """What defines this run: a resumed run must match it (computed on rank 0, shared by all)."""
        settings = {k: v for k, v in self.config.to_dict().items() if k not in RESULT_NEUTRAL}
        identity = {"model": tensor_digest(model.state_dict()), "model_class": type(model).__name__,
                    "examples": num_examples, "settings": settings, "plan": dataclasses.asdict(self.plan),
                    "groups": dict(self.spec.groups), "loss_fn": getattr(self.loss_fn, "__qualname__", None)}
        first = _first_example(clean_data)
        if torch.is_tensor(first):
            identity["first_example"] = tensor_digest([first])
        return ddp.broadcast_object(json.loads(json.dumps(identity)))  # as a checkpoint will read it back

    def _save(self, interim: bool = False) -> None:
        if self.checkpoint_dir is None:
            return
        if interim and time.perf_counter() - self.last_save < self.interval_s:
            return
        if ddp.is_main():
            tensors, meta = self.state.to_checkpoint(self.current, self.stage1_point, self.identity,
                                                     time.perf_counter() - self.started)
            checkpoint.save(self.checkpoint_dir, tensors, meta)
        ddp.barrier()
        self.last_save = time.perf_counter()

    def _restore(self) -> None:
        tensors, meta = checkpoint.load(self.checkpoint_dir)
        if not isinstance(meta.get("identity"), dict):
            raise checkpoint.CheckpointError(f"the checkpoint in {self.checkpoint_dir} has no run identity")
        checkpoint.check_same_run(meta["identity"], self.identity, self.checkpoint_dir)
        try:
            restored = RunState.from_checkpoint(tensors, meta, self.config.rounds, dict(self.spec.groups))
            self.current.load_state_dict(restored.model)
            if restored.stage1 is not None:
                self.stage1_point = copy.deepcopy(self.current)
                self.stage1_point.load_state_dict(restored.stage1)
        except (checkpoint.CheckpointError, RuntimeError) as error:
            raise checkpoint.CheckpointError(f"the checkpoint in {self.checkpoint_dir} cannot be resumed: "
                                             f"{error}") from None
        torch.set_rng_state(restored.rng)
        self.state = restored.state
        self.result.history, self.result.perms = self.state.history, self.state.perms
        self.result.resumed_from = str(self.checkpoint_dir)
        self.started -= restored.elapsed_s


def _require_finite(model: nn.Module, what: str) -> None:
    """Stop the run where it diverged: no later step, and no purified file, may build on NaN/inf weights."""
    if not all_finite(list(model.parameters()) + list(model.buffers())):
        raise DivergedError(f"{what} has NaN/inf weights or BatchNorm statistics: the run diverged there (lower "
                            "the learning rate, or check the clean data)")


def _first_example(data: Dataset | DataLoader) -> Any:
    """The input of the dataset's first example (not of a batch: a shuffled DataLoader's first batch varies)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return batch_inputs(dataset[0])
    except (TypeError, IndexError, KeyError):
        return None


def _stage_record(round_: int, stage: int, t: float, losses: list[float], alignment: dict[str, Any],
                  seconds: dict[str, float]) -> dict[str, Any]:
    return {"round": round_ + 1, "stage": stage, "t": t, "curve_losses": losses,
            "perm_cost": {"identity": alignment["cost_identity"], "achieved": alignment["cost_achieved"]},
            "seconds": {**seconds, **{f"align_{k}": v for k, v in alignment["seconds"].items()}}}
