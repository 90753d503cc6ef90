"""Self-supervised TSC: a SimCLR-style encoder on the digits, backdoored during pre-training, purified without labels.

    result = run_ssl_experiment(seed=0)     # {"before": {"acc", "asr"}, "tsc": {...}, "ft": {...}, ...}

- ``SimCLRNet``: the digits CNN trunk (``features``) and a two-layer projection head (``forward``); the trunk's
  pooled features are what a linear probe reads, the projection is what the contrastive loss sees.
- The contrastive loss and its augmentations are the library's (:mod:`tsc_fast.losses`): ``augment_views``,
  ``nt_xent``, ``contrastive_loss_fn``.
- ``pretrain_simclr``: Adam pre-training; with a ``BackdoorObjective``, a trigger is implanted during pre-training:
  triggered views are pulled towards the mean feature of reference images of the target class (squared distance
  per feature dimension in units of its clean spread, ``relative_pull``), in the spirit of BadEncoder (Jia et al.
  2022), so a linear probe later fitted on clean labelled data maps triggered inputs to the target class.
  Defaults (weight 3, 10% of each batch triggered, 16 reference images, 40 epochs): probe ACC about 94-97%,
  ASR about 87% on seed 0 (a 2x2 patch cannot erase the digit's own features after global pooling, so the
  implant is not total).
- ``linear_probe``: logistic regression on frozen (standardised) features, fitted on the clean training set;
  ACC on the clean test set, ASR on triggered test images whose label is not the target.
- TSC purifies with ``contrastive_loss_fn`` as its ``loss_fn``; labels are never read (the experiment hands purify
  images only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..data.embedded import load_digits_split
from ..data.splits import clean_subset
from ..losses import DEFAULT_TEMPERATURE, Augmentation, augment_views, contrastive_loss_fn, nt_xent
from ..models import DigitsCNN
from ..module_tools import model_device
from ..tsc import TSCConfig
from .attacks import Attack, BadNets
from .defenses import run_defense


class SimCLRNet(DigitsCNN):
    """Digits encoder (DigitsCNN's trunk, ``features`` -> 2w) plus a projection head instead of the classifier.

    projection: Linear(2w->2w), ReLU, Linear(2w->projection_dim) -> ``forward``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, projection_dim: int = 32):
        super().__init__(in_channels=in_channels, width=width)
        del self.fc
        self.projection = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(),
                                        nn.Linear(2 * width, projection_dim))

    @property
    def feature_dim(self) -> int:
        return self.conv3.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x))


# ---------------------------------------------------------------------------------------------------------------
# augmentation and loss


@dataclass
class BackdoorObjective:
    """The attacker's extra pre-training term, ``weight * relative_pull``, over triggered copies of a ``fraction``
    of each batch's views: their features are pulled to the mean feature of ``reference`` target-class images."""

    attack: Attack
    reference: torch.Tensor       # images of the target class the attacker holds
    fraction: float = 0.1
    weight: float = 1.0


def relative_pull(triggered: torch.Tensor, reference: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean over feature dimensions of (f(trigger) - f_ref)^2 / var(clean feature): the squared distance of the
    triggered features to the (detached) mean reference feature, each dimension in units of its clean spread.

    This is the distance a standardising linear probe sees, and it is scale-free, so the encoder cannot satisfy it
    by shrinking features. (A cosine pull is too weak here: pooled ReLU features are non-negative, every cosine is
    high, and a cosine ignores how far along a direction a feature lies, which is what a probe reads.)
    """
    anchor = reference.mean(0, keepdim=True).detach()
    variance = clean.var(0, keepdim=True).clamp_min(1e-6)
    return ((triggered - anchor).pow(2) / variance).mean()


def _triggered_views(views: torch.Tensor, objective: BackdoorObjective, generator: torch.Generator) -> torch.Tensor:
    """Triggered copies of a random ``objective.fraction`` of the views (at least one)."""
    count = max(1, int(round(objective.fraction * len(views))))
    pick = torch.randperm(len(views), generator=generator)[:count].to(views.device)
    return objective.attack.apply(views[pick])


def simclr_loss(model: SimCLRNet, batch: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                augmentation: Augmentation = Augmentation(), backdoor: BackdoorObjective | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One pre-training loss: NT-Xent of two views, plus the attacker's term when ``backdoor`` is given.

    Clean views, triggered views and reference images go through the trunk in ONE pass, so BatchNorm normalises
    them with the same batch statistics.
    """
    v1, v2 = augment_views(batch, augmentation, generator)
    parts = [v1, v2]
    if backdoor is not None:
        parts += [_triggered_views(v1, backdoor, generator), backdoor.reference.to(batch.device)]
    feats = model.features(torch.cat(parts))
    n = len(batch)
    z = model.projection(feats[: 2 * n])
    loss = nt_xent(z[:n], z[n:], temperature)
    if backdoor is None:
        return loss
    n_ref = len(backdoor.reference)
    triggered, reference = feats[2 * n: len(feats) - n_ref], feats[len(feats) - n_ref:]
    return loss + backdoor.weight * relative_pull(triggered, reference, feats[: 2 * n])


def pretrain_simclr(model: SimCLRNet, x: torch.Tensor, epochs: int = 40, batch_size: int = 256, lr: float = 3e-3,
                    temperature: float = DEFAULT_TEMPERATURE, augmentation: Augmentation = Augmentation(),
                    backdoor: BackdoorObjective | None = None, seed: int = 0) -> list[float]:
    """Pre-train ``model`` in place with Adam (cosine schedule) on ``simclr_loss`` over images ``x`` (labels are
    never used); returns the mean loss per epoch. With ``backdoor`` the attacker's term is added."""
    if len(x) < 2:
        raise ValueError("need at least 2 images to pre-train")
    device = model_device(model)
    x = x.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    model.train()
    losses = []
    for _ in range(epochs):
        total, steps = 0.0, 0
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            if len(index) < 2:      # NT-Xent needs negatives
                continue
            loss = simclr_loss(model, x[index.to(device)], temperature, augmentation, backdoor, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        schedule.step()
        losses.append(total / max(steps, 1))
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------
# linear probe


@torch.no_grad()
def encode(model: SimCLRNet, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Frozen features of ``x`` in eval mode, as a float64 array (the model's mode is restored)."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        parts = [model.features(x[i: i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


@dataclass
class LinearProbe:
    """A logistic-regression probe on standardised frozen features."""

    model: SimCLRNet
    classifier: Any     # sklearn Pipeline(StandardScaler, LogisticRegression)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(encode(self.model, x))

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Percent of ``x`` predicted as ``y``."""
        return float((self.predict(x) == y.cpu().numpy()).mean() * 100)

    def attack_success_rate(self, x: torch.Tensor, y: torch.Tensor, attack: Attack) -> float:
        """Percent of triggered non-target images predicted as the target."""
        keep = y != attack.target
        return float((self.predict(attack.apply(x[keep])) == attack.target).mean() * 100)


def linear_probe(model: SimCLRNet, x_train: torch.Tensor, y_train: torch.Tensor, c: float = 1.0,
                 max_iter: int = 2000) -> LinearProbe:
    """Fit a logistic-regression probe on ``model``'s frozen features of the labelled training set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    classifier.fit(encode(model, x_train), y_train.cpu().numpy())
    return LinearProbe(model, classifier)


def probe_metrics(model: SimCLRNet, splits_train: tuple[torch.Tensor, torch.Tensor],
                  splits_test: tuple[torch.Tensor, torch.Tensor], attack: Attack) -> dict[str, float]:
    """``{"acc", "asr"}`` (percent) of a probe fitted on the training set, measured on the test set."""
    probe = linear_probe(model, *splits_train)
    x_test, y_test = splits_test
    return {"acc": probe.accuracy(x_test, y_test), "asr": probe.attack_success_rate(x_test, y_test, attack)}


# ---------------------------------------------------------------------------------------------------------------
# the experiment


@dataclass
class SSLSetup:
    """A backdoored SimCLR encoder on the digits with its data and attack."""

    model: SimCLRNet
    attack: Attack
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    pretrain_losses: list[float]
    pretrain_seconds: float


def make_backdoored_encoder(seed: int = 0, target: int = 0, epochs: int = 40, reference_count: int = 16,
                            poison_fraction: float = 0.1, backdoor_weight: float = 3.0,
                            temperature: float = DEFAULT_TEMPERATURE, split_seed: int = 0) -> SSLSetup:
    """Pre-train a SimCLR encoder on the digits training images with a BadNets trigger implanted.

    The attacker holds ``reference_count`` target-class training images; ``poison_fraction`` of each batch is
    triggered and pulled towards their mean feature.
    """
    splits = load_digits_split(seed=split_seed)
    x_train, y_train = splits.train_tensors()
    attack = BadNets(splits.image_shape, target=target)
    rng = torch.Generator().manual_seed(seed)
    target_images = x_train[y_train == target]
    reference = target_images[torch.randperm(len(target_images), generator=rng)[:reference_count]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SimCLRNet(in_channels=splits.image_shape[0])
    objective = BackdoorObjective(attack, reference, fraction=poison_fraction, weight=backdoor_weight)
    started = time.perf_counter()
    losses = pretrain_simclr(model, x_train, epochs=epochs, temperature=temperature, backdoor=objective, seed=seed)
    return SSLSetup(model, attack, (x_train, y_train), splits.test_tensors(), losses, time.perf_counter() - started)


def run_ssl_experiment(seed: int = 0, clean_fraction: float = 0.05, tsc_config: Any = None,
                       pretrain_epochs: int = 40, with_ft: bool = True, temperature: float = DEFAULT_TEMPERATURE,
                       setup: SSLSetup | None = None) -> dict[str, Any]:
    """Backdoor a SimCLR encoder, purify it with TSC (NT-Xent loss, images only), and probe it before and after.

    Returns ``{"before": {"acc", "asr"}, "tsc": {"acc", "asr", "seconds", "steps"}, "ft": {...} (if with_ft),
    "pretrain_seconds", "clean_examples", "seed"}``; ACC/ASR in percent from a linear probe refitted on the clean
    training set for every encoder. FT fine-tunes with the same NT-Xent loss at the same step budget as one TSC
    curve (the harness's default).
    """

    setup = setup or make_backdoored_encoder(seed=seed, epochs=pretrain_epochs, temperature=temperature)
    x_train, y_train = setup.train
    images = clean_subset((x_train, y_train), clean_fraction, seed=seed)[0]
    unlabelled = TensorDataset(images)           # no labels reach the defenses
    loss_fn = contrastive_loss_fn(temperature, seed=seed)
    report: dict[str, Any] = {"seed": seed, "clean_examples": len(images), "pretrain_seconds": setup.pretrain_seconds,
                              "before": probe_metrics(setup.model, setup.train, setup.test, setup.attack)}
    config = tsc_config if tsc_config is not None else TSCConfig(progress=False, seed=seed)
    defended = {"tsc": run_defense("tsc", setup.model, unlabelled, config, loss_fn=loss_fn)}
    if with_ft:
        defended["ft"] = run_defense("ft", setup.model, unlabelled, {"seed": seed},
                                     loss_fn=contrastive_loss_fn(temperature, seed=seed))
    for name, result in defended.items():
        report[name] = {**probe_metrics(result.model, setup.train, setup.test, setup.attack),
                        "seconds": result.seconds, "steps": result.budget["steps"]}
    return report

