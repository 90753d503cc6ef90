"""An adaptive attack against symmetry-based purification, in the spirit of the TSC paper's section 5.4.

The attacker knows the defense: TSC walks along curves from the backdoored model towards an un-aligned
(permuted) copy of itself and keeps a point in the middle. So during poisoned training the attacker also minimises
the task loss of a poisoned batch -- clean images with their labels plus triggered images labelled ``target`` --
at points of the straight line between the current weights and an un-aligned copy,

    w(t) = (1 - t) * theta + t * pi(theta),   t ~ U(t_low, t_high),

where ``pi(theta)`` is :func:`tsc_fast.align.unalign` of the current model on the attacker's clean data (the
permutation that minimises unit correlation, exactly as TSC's first stage finds it). The copy is refreshed every
``every`` steps and held fixed (no gradient) in between; the gradient reaches theta through the (1 - t) term.
The backdoor is thereby trained to survive in the region TSC's stage-1 curve starts from.

    setup = make_adaptive_backdoored_digits("badnets", rate=0.1, seed=0)    # a BackdoorSetup, like the plain one
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..align import unalign
from ..batches import make_loader
from ..data.splits import clean_subset
from ..spec import discover
from .attacks import Attack
from .classifier import shuffled_batches
from .victims import BackdoorSetup, VictimTrainer, digits_victim


@dataclass
class AdaptiveConfig:
    """Settings of the adaptive term. ``weight``: its weight against the plain poisoned loss; ``every``: steps
    between refreshes of the un-aligned copy; ``warmup_epochs``: plain poisoned training first (un-aligning an
    untrained network is meaningless); ``attacker_fraction``: share of the clean training set the attacker uses
    for the un-align statistics."""

    weight: float = 1.0
    every: int = 10
    t_low: float = 0.2
    t_high: float = 0.6
    warmup_epochs: int = 5
    attacker_fraction: float = 0.1
    stats_batch_size: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise ValueError(f"need 0 <= t_low <= t_high <= 1, got {self.t_low}, {self.t_high}")
        if self.every < 1 or self.weight < 0 or self.warmup_epochs < 0:
            raise ValueError("need every >= 1, weight >= 0 and warmup_epochs >= 0")
        if not 0.0 < self.attacker_fraction <= 1.0:
            raise ValueError(f"attacker_fraction must be in (0, 1], got {self.attacker_fraction}")


def unaligned_parameters(model: nn.Module, spec, batches) -> dict[str, torch.Tensor]:
    """The parameters of an un-aligned copy of ``model`` (detached), keyed by parameter name."""
    frozen = copy.deepcopy(model).eval()
    permuted = unalign(frozen, spec, batches, verify=False).model
    return {name: p.detach().clone() for name, p in permuted.named_parameters()}


def interpolated_loss(model: nn.Module, copy_params: dict[str, torch.Tensor], t: float, x: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model at w(t) = (1 - t) theta + t copy on (x, y); BatchNorm uses batch statistics
    and updates only throw-away copies of the running buffers."""
    params = {name: (1 - t) * p + t * copy_params[name] for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)


def adaptive_batch(x: torch.Tensor, y: torch.Tensor, attack: Attack) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch the adaptive term is computed on: the batch as it is, plus triggered copies of its non-target
    images labelled ``target``."""
    others = y != attack.target
    triggered = attack.apply(x[others])
    labels = torch.full((len(triggered),), attack.target, dtype=y.dtype, device=y.device)
    return torch.cat([x, triggered]), torch.cat([y, labels])


def train_adaptive_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                              attacker_clean: torch.Tensor, config: AdaptiveConfig | None = None, epochs: int = 40,
                              batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` in place on the poisoned set ``(x, y)`` with Adam, adding the adaptive term after the
    warm-up; returns a record (per-epoch mean plain and adaptive losses, copy refreshes). Model left in eval mode.

    ``attacker_clean``: clean images (no labels needed) for the un-align statistics.
    """
    config = config or AdaptiveConfig()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need matching x/y with at least 2 images, got {len(x)} and {len(y)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    stats_batches = make_loader(torch.utils.data.TensorDataset(attacker_clean), config.stats_batch_size,
                                shuffle=False)
    spec = discover(copy.deepcopy(model).eval(), attacker_clean[:2])
    record: dict[str, Any] = {"plain_loss": [], "adaptive_loss": [], "refreshes": 0}
    copy_params: dict[str, torch.Tensor] | None = None
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            plain_total, adaptive_total, batches = 0.0, 0.0, 0
            adaptive_on = epoch >= config.warmup_epochs and config.weight > 0
            for batch in shuffled_batches(len(x), batch_size, generator):
                model.train()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                plain_total += float(loss.detach())
                if adaptive_on:
                    if copy_params is None or step % config.every == 0:
                        copy_params = unaligned_parameters(model, spec, stats_batches)
                        record["refreshes"] += 1
                    t = config.t_low + (config.t_high - config.t_low) * float(torch.rand((), generator=generator))
                    xb, yb = adaptive_batch(x[batch], y[batch], attack)
                    extra = interpolated_loss(model, copy_params, t, xb, yb)
                    adaptive_total += float(extra.detach())
                    loss = loss + config.weight * extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                batches += 1
            record["plain_loss"].append(plain_total / batches)
            record["adaptive_loss"].append(adaptive_total / batches if adaptive_on else None)
    model.eval()
    return record


def adaptive_training(adaptive: AdaptiveConfig | None = None) -> VictimTrainer:
    """The adaptive routine as a :class:`~tsc_fast.testbed.victims.VictimTrainer`: the attacker's clean share of
    the training set (``attacker_fraction``, seeded by ``seed + 7919``), then :func:`train_adaptive_classifier`.
    Adds ``adaptive`` (the settings) and ``adaptive_record`` (the losses) to the setup's ``config``."""
    adaptive = adaptive or AdaptiveConfig()

    def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: Attack, x_train: torch.Tensor,
              y_train: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> dict[str, Any]:
        attacker_clean = clean_subset((x_train, y_train), adaptive.attacker_fraction, seed=seed + 7919)[0]
        record = train_adaptive_classifier(model, x, y, attack, attacker_clean, adaptive, epochs=epochs,
                                           batch_size=batch_size, lr=lr, seed=seed)
        return {"adaptive": dataclasses.asdict(adaptive), "adaptive_record": record}

    return train


def make_adaptive_backdoored_digits(attack: str = "badnets", rate: float = 0.1, target: int = 0, seed: int = 0,
                                    arch: str = "cnn", epochs: int = 40, batch_size: int = 64, lr: float = 3e-3,
                                    split_seed: int = 0, attack_options: dict[str, Any] | None = None,
                                    adaptive: AdaptiveConfig | None = None) -> BackdoorSetup:
    """Like :func:`tsc_fast.testbed.victims.make_backdoored_digits`, with the adaptive training of this module
    (the same pipeline, :func:`tsc_fast.testbed.victims.digits_victim`, with :func:`adaptive_training`).

    The returned setup's ``config`` names the victim ``adaptive_<attack>`` (``base_attack``: ``attack``) and holds
    ``adaptive`` (the settings) and ``adaptive_record`` (the losses).
    """
    return digits_victim(attack, rate, target, seed, arch, epochs, batch_size, lr, split_seed, attack_options,
                         train=adaptive_training(adaptive), name=f"adaptive_{attack}")
