"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, "Input-aware dynamic backdoor attack", NeurIPS 2020,
arXiv 2010.08138). Dirty label, with the paper's cross-trigger mode.

Trigger: ``x + m(x) (g(x) - x)`` from a trained pattern generator ``g`` and mask generator ``m``, different for
every input. Parameters: ``mask_density`` (default 0.1), ``lambda_div`` (default 1), ``lambda_norm`` (default
100), ``backdoor_prob`` and ``cross_prob`` (default 0.1 each), ``cross_ratio`` (default 1), ``mask_steps``
(default 200), ``train_steps`` (default 400), ``batch_size`` (default 128), ``lr`` (default 1e-2), ``hidden``
(generator width, default 16), ``generator_seed`` (default 0). Also here: the ``diversity_loss``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.splits import round_half_up
from ...models import DigitsCNN
from .base import Attack, PoisonedSet, _check_training_pair, choose_cross_indices


def _small_generator(in_channels: int, out_channels: int, hidden: int) -> nn.Module:
    """Three 3x3 convolutions with ReLUs and a sigmoid: an image-to-image map with outputs in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, out_channels, 3, padding=1), nn.Sigmoid(),
    )


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Input-aware's diversity term: mean over pairs of ``||x1 - x2|| / ||g(x1) - g(x2)||`` (small when distinct
    inputs get distinct outputs)."""
    input_distance = (x1 - x2).flatten(1).norm(dim=1)
    output_distance = (out1 - out2).flatten(1).norm(dim=1)
    return (input_distance / (output_distance + 1e-6)).mean()


class InputAware(Attack):
    """Input-aware dynamic backdoor (IAD; Nguyen & Tran, "Input-aware dynamic backdoor attack", NeurIPS 2020,
    arXiv 2010.08138). Dirty label, with the paper's cross-trigger mode.

    Trigger: ``x + m(x) (g(x) - x)``: a pattern generator ``g`` and a mask generator ``m`` (small conv nets, outputs
    in (0, 1)) make a different trigger for every image. Training (``fit``, done on the poisoning data the first
    time ``poison`` runs): (1) ``mask_steps`` Adam steps on ``m`` alone with the diversity loss plus
    ``lambda_norm * relu(mean(m) - mask_density)``; (2) ``train_steps`` joint Adam steps of ``g`` and a small
    classifier (``DigitsCNN`` of width 16) on batches where a ``backdoor_prob`` share is triggered and relabelled
    to the target, a ``cross_prob`` share carries another image's trigger with its true label, the rest are clean;
    loss = cross-entropy + ``lambda_div`` * diversity(g). Poisoning then uses the frozen generators: ``rate`` of the
    images get their own trigger and the target label, ``cross_ratio`` times as many others get a trigger made from
    a different image and keep their label (``PoisonedSet.cross_index``).
    Shortcuts (to train in seconds on a CPU): tiny generators instead of the paper's encoder-decoders, the
    generator trained against its own small classifier and then frozen (the paper trains it jointly with the victim
    itself), and a static poisoned set. Defaults: ``mask_density`` 0.1 (paper 0.032 at 32x32; larger so a mask
    covers a few pixels at 8x8), ``lambda_div`` 1, ``lambda_norm`` 100, ``backdoor_prob`` = ``cross_prob`` 0.1,
    ``cross_ratio`` 1.
    """

    name = "input_aware"

    def __init__(
        self,
        image_shape: Sequence[int],
        target: int = 0,
        mask_density: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        backdoor_prob: float = 0.1,
        cross_prob: float = 0.1,
        cross_ratio: float = 1.0,
        mask_steps: int = 200,
        train_steps: int = 400,
        batch_size: int = 128,
        lr: float = 1e-2,
        hidden: int = 16,
        generator_seed: int = 0,
    ):
        super().__init__(image_shape, target)
        if not 0.0 < mask_density <= 1.0:
            raise ValueError(f"mask_density must be in (0, 1], got {mask_density}")
        if backdoor_prob < 0 or cross_prob < 0 or backdoor_prob + cross_prob > 1 or cross_ratio < 0:
            raise ValueError(f"need backdoor_prob, cross_prob >= 0 with sum <= 1 and cross_ratio >= 0, got "
                             f"{backdoor_prob}, {cross_prob}, {cross_ratio}")
        if mask_steps < 0 or train_steps < 0 or batch_size < 2 or lr <= 0:
            raise ValueError(f"need steps >= 0, batch_size >= 2 and lr > 0, got {mask_steps}, {train_steps}, "
                             f"{batch_size}, {lr}")
        self.mask_density, self.lambda_div, self.lambda_norm = float(mask_density), float(lambda_div), float(lambda_norm)
        self.backdoor_prob, self.cross_prob, self.cross_ratio = float(backdoor_prob), float(cross_prob), float(cross_ratio)
        self.mask_steps, self.train_steps, self.batch_size, self.lr = int(mask_steps), int(train_steps), int(batch_size), float(lr)
        self.generator_seed = int(generator_seed)
        channels = self.image_shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            self.pattern_generator = _small_generator(channels, channels, hidden)
            self.mask_generator = _small_generator(channels, 1, hidden)
        self.fitted = False

    # the trigger ------------------------------------------------------------------------------------------------
    def _combine(self, batch: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``batch`` stamped with the trigger that the generators make from ``source``."""
        pattern, mask = self.pattern_generator(source), self.mask_generator(source)
        return batch + mask * (pattern - batch)

    def _trigger(self, batch: torch.Tensor) -> torch.Tensor:
        return self.cross_trigger(batch, batch)

    def cross_trigger(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` stamped with the triggers made from ``source`` (same shape): the paper's cross-trigger images."""
        if not self.fitted:
            raise RuntimeError("InputAware: call fit(x, y) (or poison) before applying the trigger")
        batch, source_batch = self._as_batch(x), self._as_batch(source)
        if batch.shape != source_batch.shape:
            raise ValueError(f"x and source must have the same shape, got {tuple(x.shape)} and {tuple(source.shape)}")
        device = batch.device
        self.pattern_generator.to(device)
        self.mask_generator.to(device)
        with torch.no_grad():
            out = self._combine(batch.float(), source_batch.float()).clamp(0.0, 1.0).to(batch.dtype)
        return out if x.dim() == 4 else out[0]

    # training the generators ------------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> "InputAware":
        """Train the mask and pattern generators on ``(x, y)`` (see the class docstring); seeded by
        ``generator_seed``; the global torch RNG is left untouched. Returns ``self``."""
        _check_training_pair(x, y)
        self._as_batch(x[:1])
        num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
        if not 0 <= self.target < num_classes:
            raise ValueError(f"target {self.target} is not one of the {num_classes} classes")
        device = x.device
        x, y = x.float(), y.long()
        generator = torch.Generator().manual_seed(self.generator_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            classifier = DigitsCNN(self.image_shape[0], width=16, num_classes=num_classes).to(device)
        self.pattern_generator.to(device).train()
        self.mask_generator.to(device).train()
        self._fit_mask(x, generator)
        self._fit_pattern(x, y, classifier, generator)
        for net in (self.pattern_generator, self.mask_generator):
            net.eval().requires_grad_(False)
        self.fitted = True
        return self

    def _two_batches(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = min(self.batch_size, n)
        return torch.randperm(n, generator=generator)[:size], torch.randperm(n, generator=generator)[:size]

    def _fit_mask(self, x: torch.Tensor, generator: torch.Generator) -> None:
        optimizer = torch.optim.Adam(self.mask_generator.parameters(), lr=self.lr)
        for _ in range(self.mask_steps):
            first, second = self._two_batches(len(x), generator)
            x1, x2 = x[first.to(x.device)], x[second.to(x.device)]
            m1, m2 = self.mask_generator(x1), self.mask_generator(x2)
            density = F.relu(m1.flatten(1).mean(dim=1) - self.mask_density).mean()
            loss = self.lambda_div * diversity_loss(x1, x2, m1, m2) + self.lambda_norm * density
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.mask_generator.requires_grad_(False)

    def _fit_pattern(self, x: torch.Tensor, y: torch.Tensor, classifier: nn.Module, generator: torch.Generator) -> None:
        parameters = list(classifier.parameters()) + list(self.pattern_generator.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        classifier.train()
        for _ in range(self.train_steps):
            first, second = self._two_batches(len(x), generator)
            x1, y1, x2 = x[first.to(x.device)], y[first.to(y.device)], x[second.to(x.device)]
            n_backdoor = round_half_up(self.backdoor_prob * len(x1))
            n_cross = round_half_up(self.cross_prob * len(x1))
            backdoor = self._combine(x1[:n_backdoor], x1[:n_backdoor])
            cross = self._combine(x1[n_backdoor : n_backdoor + n_cross], x2[n_backdoor : n_backdoor + n_cross])
            inputs = torch.cat([backdoor, cross, x1[n_backdoor + n_cross :]])
            labels = torch.cat([torch.full_like(y1[:n_backdoor], self.target), y1[n_backdoor:]])
            p1, p2 = self.pattern_generator(x1), self.pattern_generator(x2)
            loss = F.cross_entropy(classifier(inputs), labels) + self.lambda_div * diversity_loss(x1, x2, p1, p2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # poisoning --------------------------------------------------------------------------------------------------
    def poison(
        self, x: torch.Tensor, y: torch.Tensor, rate: float = 0.1, seed: int = 0, exclude_target: bool = False
    ) -> PoisonedSet:
        """Fit the generators on ``(x, y)`` if not fitted yet, then poison: ``rate`` of the images get their own
        trigger and the target label; ``cross_ratio`` times as many others get another image's trigger and keep
        their label."""
        _check_training_pair(x, y)
        if not self.fitted:
            self.fit(x, y)
        x_poisoned, y_poisoned, index = Attack.poison(self, x, y, rate, seed, exclude_target)
        cross = choose_cross_indices(len(y), index, round_half_up(self.cross_ratio * len(index)), seed)
        if len(cross):
            donors = _other_indices(cross, len(y), seed)
            on_device = cross.to(x.device)
            x_poisoned[on_device] = self.cross_trigger(x[on_device], x[donors.to(x.device)])
        return PoisonedSet(x_poisoned, y_poisoned, index, cross)

    def __repr__(self) -> str:
        return (f"InputAware(image_shape={self.image_shape}, target={self.target}, mask_density={self.mask_density}, "
                f"cross_ratio={self.cross_ratio}, fitted={self.fitted})")


def _other_indices(index: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """For each entry of ``index``, a random index in ``range(n)`` different from it (seeded); needs n >= 2."""
    rng = np.random.default_rng([int(seed), 2])
    offsets = rng.integers(1, n, size=len(index))  # adding 1..n-1 modulo n never returns the same index
    return torch.from_numpy((np.asarray(index) + offsets) % n).long()
