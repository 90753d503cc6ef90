"""Baseline backdoor defenses in one harness with TSC: same inputs, same result type, same budget record.

    result = run_defense("fst", model, clean_data)          # "tsc", "ft", "mcr" or "fst"
    result.model       # defended plain nn.Module, eval mode (the input model is never modified)
    result.budget      # {"seconds", "steps", "epochs", "batch_size", "examples", ...}
    result.history     # per-defense record: losses, chosen t, head similarity, ...

Every defense sees exactly what TSC sees: a (possibly backdoored) model and a small clean set (a Dataset of
(x, y, ...) or a DataLoader, used as given). Batch size and augmentation follow TSC's plan (``TSCConfig.plan``:
``adaptive_batch_size`` and a random shift scaled to the image size), so budgets compare step for step.

The baselines, implemented from the papers:

- FT, plain fine-tuning of all parameters on the clean set (SGD, momentum 0.9, weight decay 5e-4, cosine).
- MCR, mode connectivity repair (Zhao et al., "Bridging Mode Connectivity in Loss Landscapes and Adversarial
  Robustness", ICLR 2020): fine-tune a copy (endpoint B), train a quadratic Bezier curve from the backdoored model
  A to B on the clean set, take the point at t and recompute its BatchNorm statistics.
- FST, feature shift tuning (Min et al., "Towards Stable Backdoor Purification through Feature Shift Tuning",
  NeurIPS 2023): re-initialise the linear head, fine-tune everything with loss = task loss + alpha * <W, W_orig>
  (the raw inner product of the new and original head weights, pushing the new head away from the compromised
  one), and after every step rescale W to the original head's Frobenius norm (the norm constraint that keeps the
  inner product from running off to minus infinity).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..batches import BatchAugment, batch_inputs, dataset_size, image_size_of, make_loader
from ..curve import BezierCurve, LossFn, cross_entropy_loss, finetune_model, recalibrate_bn, train_curve
from ..module_tools import model_device
from ..tsc import OFFICIAL_CURVE_STEPS, TSCConfig, purify

CleanData = Union[Dataset, DataLoader]

# Default step budget of FT / FST and of each MCR phase: one TSC curve's default (OFFICIAL_CURVE_STEPS = 2000).
# A full default TSC run trains 3 rounds x 2 curves of that many steps (plus short fine-tunes between rounds), so a
# baseline at this budget costs about 1/6 of TSC; raise ``steps`` to compare at equal cost.
DEFAULT_STEPS = OFFICIAL_CURVE_STEPS


@dataclass
class DefenseResult:
    """What every defense returns.

    ``model``: the defended plain nn.Module in eval mode; ``seconds``: wall time of the whole defense; ``budget``:
    optimiser steps, epochs, batch size, examples and seconds (per phase where a defense has phases);
    ``history``: the defense's own record (losses per epoch, chosen t, ...).
    """

    model: nn.Module
    seconds: float
    budget: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass
class FTConfig:
    """Plain fine-tuning on the clean set. ``steps`` sets the optimiser steps (epochs derived) unless ``epochs``
    is given; ``batch_size`` / ``augment_shift`` ``None`` means TSC's adaptive choice."""

    steps: int | None = DEFAULT_STEPS
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.01                       # the usual FT baseline rate (BackdoorBench; docs/calibration.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment_shift: int | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = False


@dataclass
class MCRConfig:
    """Mode connectivity repair: fine-tune endpoint B, then a Bezier curve A -> B, then the point at ``t``.

    ``t = 0.3``: Zhao et al. find the backdoor gone over the inner part of the path (roughly t in 0.2-0.4 from the
    backdoored end) while clean accuracy is kept; 0.3 sits in the middle of that window, chosen a priori (not
    tuned on test data). The curve settings are TSC's curve settings (SGD lr 0.02, momentum 0.9, weight decay 5e-4,
    0.5 * 1e-4 * ||w(t)||^2).
    """

    t: float = 0.3
    finetune_steps: int | None = DEFAULT_STEPS   # endpoint B: fine-tuning, FTConfig's defaults otherwise
    finetune_lr: float = 0.01
    curve_steps: int | None = DEFAULT_STEPS
    batch_size: int | None = None
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    l2_coeff: float = 1e-4
    augment_shift: int | None = None
    stats_batch_size: int = 128               # BN recalibration batches
    seed: int = 0
    device: str | None = None
    progress: bool = False


@dataclass
class FSTConfig:
    """Feature shift tuning. Defaults follow the official code (alpha 0.2, lr 0.01, SGD momentum 0.9, no weight
    decay, cosine); the step budget is this harness's common default. ``head``: the qualified name of the linear
    classifier (``None``: the last nn.Linear of the model)."""

    alpha: float = 0.2
    head: str | None = None
    steps: int | None = DEFAULT_STEPS
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment_shift: int | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = False


# ---------------------------------------------------------------------------------------------------------------
# shared pieces


@dataclass(frozen=True)
class TrainingPlan:
    """One training phase of a baseline: batch size, epochs, optimiser steps and augmentation."""

    batch_size: int
    epochs: int
    steps: int
    augment_shift: int
    augment_flip: bool = False

    @property
    def augment(self) -> BatchAugment:
        return BatchAugment(self.augment_shift, self.augment_flip)


def training_plan(clean_data: CleanData, steps: int | None, epochs: int | None, batch_size: int | None,
                  augment_shift: int | None) -> TrainingPlan:
    """Batch size, epochs, steps and shift of one training phase, planned exactly as TSC plans its curves."""
    if steps is None and epochs is None:
        raise ValueError("set steps or epochs")
    if (steps is not None and steps <= 0) or (epochs is not None and epochs <= 0):
        raise ValueError(f"steps and epochs must be positive, got steps={steps}, epochs={epochs}")
    loader_batch = clean_data.batch_size if isinstance(clean_data, DataLoader) else None
    first = batch_inputs(next(iter(make_loader(clean_data, 2, shuffle=False))))
    settings = TSCConfig(curve_steps=steps, curve_epochs=epochs, batch_size=batch_size, augment_shift=augment_shift)
    curve = settings.plan(dataset_size(clean_data), image_size_of(first), loader_batch)
    return TrainingPlan(curve.batch_size, curve.curve_epochs, curve.curve_steps, curve.augment_shift,
                        curve.augment_flip)


def _budget(plan: TrainingPlan, examples: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"seconds": seconds, "steps": plan.steps, "epochs": plan.epochs, "batch_size": plan.batch_size,
            "examples": examples, **extra}


def _fresh_copy(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device)


# ---------------------------------------------------------------------------------------------------------------
# FT


def fine_tuning_defense(model: nn.Module, clean_data: CleanData, config: FTConfig | None = None,
              loss_fn: LossFn | None = None) -> DefenseResult:
    """Fine-tune a copy of ``model`` on ``clean_data`` (all parameters, SGD with cosine schedule)."""
    config = config or FTConfig()
    started = time.perf_counter()
    device = model_device(model, config.device)
    plan = training_plan(clean_data, config.steps, config.epochs, config.batch_size, config.augment_shift)
    tuned = _fresh_copy(model, device)
    batches = make_loader(clean_data, plan.batch_size, shuffle=True, seed=config.seed)
    losses = finetune_model(tuned, batches, plan.epochs, loss_fn=loss_fn, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, augment=plan.augment, seed=config.seed,
                            device=device, desc="FT", progress=config.progress)
    seconds = time.perf_counter() - started
    return DefenseResult(tuned.eval(), seconds, _budget(plan, dataset_size(clean_data), seconds),
                         {"losses": losses, "plan": dataclasses.asdict(plan)}, name="ft")


# ---------------------------------------------------------------------------------------------------------------
# MCR


def train_mcr_curve(model: nn.Module, clean_data: CleanData, config: MCRConfig | None = None,
                    loss_fn: LossFn | None = None) -> tuple[BezierCurve, dict[str, Any]]:
    """MCR's two training phases: endpoint B by fine-tuning, then the curve from ``model`` (A) to B.

    Returns the trained curve (start = A's parameters, end = B's) and a record of both phases.
    """
    config = config or MCRConfig()
    device = model_device(model, config.device)
    t0 = time.perf_counter()
    endpoint = fine_tuning_defense(model, clean_data, FTConfig(steps=config.finetune_steps, batch_size=config.batch_size,
                                                     lr=config.finetune_lr, momentum=config.momentum,
                                                     weight_decay=config.weight_decay,
                                                     augment_shift=config.augment_shift, seed=config.seed,
                                                     device=str(device), progress=config.progress), loss_fn)
    t1 = time.perf_counter()
    plan = training_plan(clean_data, config.curve_steps, None, config.batch_size, config.augment_shift)
    start = _fresh_copy(model, device)
    curve = BezierCurve(start, endpoint.model).to(device)
    curve_losses = train_curve(curve, make_loader(clean_data, plan.batch_size, shuffle=True, seed=config.seed + 1),
                               plan.epochs, loss_fn=loss_fn, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, l2_coeff=config.l2_coeff,
                               augment=plan.augment, seed=config.seed + 1, device=device,
                               desc="MCR curve", progress=config.progress)
    t2 = time.perf_counter()
    record = {"endpoint": endpoint, "curve_losses": curve_losses, "curve_plan": dataclasses.asdict(plan),
              "seconds": {"finetune": t1 - t0, "curve": t2 - t1}}
    return curve, record


def mode_connectivity_repair(model: nn.Module, clean_data: CleanData, config: MCRConfig | None = None,
                             loss_fn: LossFn | None = None) -> DefenseResult:
    """MCR: the point at ``config.t`` of a Bezier curve from ``model`` to its fine-tuned copy, BN recalibrated."""
    config = config or MCRConfig()
    if not 0.0 <= config.t <= 1.0:
        raise ValueError(f"MCR's t must be in [0, 1], got {config.t}")
    started = time.perf_counter()
    device = model_device(model, config.device)
    curve, record = train_mcr_curve(model, clean_data, config, loss_fn)
    t_bn = time.perf_counter()
    point = curve.point(config.t)
    recalibrate_bn(point, make_loader(clean_data, config.stats_batch_size, shuffle=False), device=device)
    seconds = time.perf_counter() - started
    endpoint: DefenseResult = record.pop("endpoint")
    record["seconds"]["bn"] = time.perf_counter() - t_bn
    curve_plan = record["curve_plan"]
    budget = {"seconds": seconds, "steps": endpoint.budget["steps"] + curve_plan["steps"],
              "epochs": endpoint.budget["epochs"] + curve_plan["epochs"],
              "batch_size": curve_plan["batch_size"], "examples": dataset_size(clean_data),
              "phases": {"finetune": endpoint.budget, "curve": {"steps": curve_plan["steps"],
                                                                "epochs": curve_plan["epochs"],
                                                                "seconds": record["seconds"]["curve"]}}}
    history = {"t": config.t, "finetune_losses": endpoint.history["losses"], **record}
    return DefenseResult(point.eval(), seconds, budget, history, name="mcr")


# ---------------------------------------------------------------------------------------------------------------
# FST


def find_linear_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The linear classifier: the module called ``name``, or the last nn.Linear in registration order."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"the model has no module named {name!r}")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"module {name!r} is a {type(modules[name]).__name__}, FST needs an nn.Linear head")
        return name, modules[name]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to use as FST's classifier head; pass its name")
    return linears[-1]


@torch.no_grad()
def reinitialise_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, as FST's official code and nn.Linear's
    bias default; drawn from ``generator`` so the global RNG is left alone."""
    bound = 1.0 / math.sqrt(layer.in_features)
    for p in (layer.weight, layer.bias):
        if p is not None:
            fresh = torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 * bound - bound
            p.copy_(fresh.to(p.device))


def head_cosine(weight: torch.Tensor, original: torch.Tensor) -> float:
    """Cosine similarity of two weight matrices taken as flat vectors."""
    return float(torch.nn.functional.cosine_similarity(weight.detach().reshape(1, -1), original.reshape(1, -1)))


def feature_shift_tuning(model: nn.Module, clean_data: CleanData, config: FSTConfig | None = None,
                         loss_fn: LossFn | None = None) -> DefenseResult:
    """FST: re-initialised head, fine-tuning with an alignment penalty to the original head, norm-projected head."""
    config = config or FSTConfig()
    started = time.perf_counter()
    device = model_device(model, config.device)
    plan = training_plan(clean_data, config.steps, config.epochs, config.batch_size, config.augment_shift)
    tuned = _fresh_copy(model, device)
    head_name, head = find_linear_head(tuned, config.head)
    original = head.weight.detach().clone()
    original_norm = original.norm()
    reinitialise_linear(head, torch.Generator().manual_seed(config.seed))
    task_loss = loss_fn or cross_entropy_loss
    cosines = [head_cosine(head.weight, original)]

    def project_head() -> None:
        # the norm constraint: the head keeps the original head's Frobenius norm
        with torch.no_grad():
            head.weight.mul_(original_norm / head.weight.norm().clamp_min(1e-12))

    def fst_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        project_head()  # projecting before each step == projecting after the previous one
        alignment = (head.weight * original).sum()
        return task_loss(model, batch) + config.alpha * alignment

    # the plain fine-tuning loop with FST's loss (so it also runs data-parallel, like FT)
    losses = finetune_model(tuned, make_loader(clean_data, plan.batch_size, shuffle=True, seed=config.seed),
                            plan.epochs, loss_fn=fst_loss, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, augment=plan.augment, seed=config.seed,
                            device=device, desc="FST", progress=config.progress)
    project_head()
    cosines.append(head_cosine(head.weight, original))
    seconds = time.perf_counter() - started
    history = {"losses": losses, "head": head_name, "alpha": config.alpha,
               "head_cosine": {"initial": cosines[0], "final": cosines[1]},
               "head_norm": {"original": float(original_norm), "final": float(head.weight.detach().norm())},
               "plan": dataclasses.asdict(plan)}
    return DefenseResult(tuned, seconds, _budget(plan, dataset_size(clean_data), seconds), history, name="fst")


# ---------------------------------------------------------------------------------------------------------------
# TSC


def tsc_defense(model: nn.Module, clean_data: CleanData, config: TSCConfig | None = None,
                loss_fn: LossFn | None = None) -> DefenseResult:
    """TSC through ``tsc_fast.purify``; the budget counts every curve's and every in-between fine-tune's steps."""
    config = config or TSCConfig(progress=False)
    result = purify(model, clean_data, loss_fn=loss_fn, config=config)
    plan = result.plan
    per_epoch = plan.curve_steps // plan.curve_epochs
    curves = 2 * config.rounds
    finetunes = (config.rounds - 1) * config.finetune_epochs if config.finetune_epochs > 0 else 0
    budget = {"seconds": result.seconds, "steps": curves * plan.curve_steps + finetunes * per_epoch,
              "epochs": curves * plan.curve_epochs + finetunes, "batch_size": plan.batch_size,
              "examples": dataset_size(clean_data),
              "phases": {"curves": {"count": curves, "steps": curves * plan.curve_steps},
                         "finetune": {"epochs": finetunes, "steps": finetunes * per_epoch}}}
    history = {"stages": result.history, "plan": dataclasses.asdict(plan), "spec_groups": dict(result.spec.groups)}
    return DefenseResult(result.model.eval(), result.seconds, budget, history, name="tsc")


# ---------------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class DefenseEntry:
    run: Callable[..., DefenseResult]
    config_type: type
    default_config: Callable[[], Any]
    description: str


DEFENSES: dict[str, DefenseEntry] = {
    "tsc": DefenseEntry(tsc_defense, TSCConfig, lambda: TSCConfig(progress=False),
                        "TSC: permutation un-/re-alignment and Bezier curves (tsc_fast.purify)"),
    "ft": DefenseEntry(fine_tuning_defense, FTConfig, FTConfig, "plain fine-tuning on the clean set"),
    "mcr": DefenseEntry(mode_connectivity_repair, MCRConfig, MCRConfig,
                        "mode connectivity repair (Zhao et al. 2020)"),
    "fst": DefenseEntry(feature_shift_tuning, FSTConfig, FSTConfig, "feature shift tuning (Min et al. 2023)"),
}


def _resolve_config(name: str, entry: DefenseEntry, config: Any) -> Any:
    if config is None:
        return entry.default_config()
    if isinstance(config, dict):
        known = {f.name for f in dataclasses.fields(entry.config_type)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{name}: unknown settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(entry.default_config(), **config)
    if not isinstance(config, entry.config_type):
        raise TypeError(f"defense {name!r} takes a {entry.config_type.__name__} (or a dict of its fields), "
                        f"got {type(config).__name__}")
    return config


def run_defense(name: str, model: nn.Module, clean_data: CleanData, config: Any = None,
                loss_fn: LossFn | None = None) -> DefenseResult:
    """Run the defense ``name`` ("tsc", "ft", "mcr", "fst") on a copy of ``model`` with ``clean_data``.

    ``config``: that defense's config dataclass (TSCConfig, FTConfig, MCRConfig, FSTConfig), a dict of its fields
    (overriding the harness defaults), or None for the defaults. ``loss_fn(model, batch)`` replaces cross-entropy.
    The input model is not modified; the result's model is a plain nn.Module in eval mode.
    """
    if not isinstance(name, str):
        raise TypeError(f"defense name must be a string, got {type(name).__name__}")
    entry = DEFENSES.get(name.lower())
    if entry is None:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = _resolve_config(name, entry, config)
    return entry.run(model, clean_data, config, loss_fn)
