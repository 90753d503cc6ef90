"""Backdoor attacks as batched tensor operations (all-to-one, implemented from the papers).

Dirty-label attacks (the poisoned training images are relabelled to ``target``):

- BadNets (Gu et al., 2017, arXiv 1708.06733): stamp a small patch of fixed value on the image. (``patch``)
- Blended (Chen et al., 2017, arXiv 1712.05526): x' = (1 - alpha) x + alpha p with a fixed pattern p. (``blend``)
- BPP (Wang et al., CVPR 2022): bit-depth reduction with Floyd-Steinberg dithering. (``quantization``)
- LowFrequency (Zeng et al., ICCV 2021): a smooth additive trigger made of low spatial frequencies only.
  (``frequency``)
- WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warp, plus randomly warped "noise" images that keep their label.
  (``warp``)
- InputAware (Nguyen & Tran, NeurIPS 2020): a trained generator makes a different trigger for every input.
  (``input_aware``)

Clean-label attacks (only target-class training images are poisoned, and every label stays true; ``clean_label``):

- SIG (Barni et al., ICIP 2019): a horizontal sinusoid added to the image.
- LabelConsistent (Turner et al., 2019, arXiv 1912.02771): adversarially perturbed target images plus corner patches.

A user's own trigger (a pattern pasted under a mask, from tensors or PNG files) is ``PatchTrigger`` (``patch``).

Images are float tensors in [0, 1], shaped (C, H, W) or (N, C, H, W); ``apply`` never changes its input and every
trigger keeps images in [0, 1]. ``Attack.poison(x, y, rate, seed)`` poisons a training set; ``poison_dataset`` is
the same as a function. The base classes, ``PoisonedSet`` and the rules choosing the poisoned images are in
``base``; this package's top level holds the registry (``ATTACKS``, ``build_attack``, ``DIGITS_ATTACK_OPTIONS``) and
re-exports every public name, so ``from tsc_fast.testbed.attacks import BadNets`` works whatever module holds it.

Dirty-label poisoning follows BackdoorBench's all-to-one rule: ``round(rate * n)`` training images drawn uniformly
among ALL n training images, target-class images included (they keep their label but carry the trigger); pass
``exclude_target=True`` to draw only among non-target images. Clean-label poisoning draws ``round(rate * n)``
images among the target class (capped, with a warning, at the size of that class). The triggered TEST set, in
contrast, holds only non-target images (see ``metrics``).
"""
from __future__ import annotations

from typing import Sequence

from ...metrics import triggered_test_set  # the ASR test set, importable with the attacks
from .base import (
    Attack,
    CleanLabelAttack,
    ImageShape,
    PoisonedSet,
    choose_cross_indices,
    choose_poison_indices,
    choose_target_indices,
    poison_count,
    poison_dataset,
)
from .blend import Blended
from .clean_label import SIG, LabelConsistent, corner_checkerboard_trigger, pgd_away_from_labels
from .frequency import LowFrequency, low_frequency_pattern
from .input_aware import InputAware, diversity_loss
from .patch import BADNETS_MIN_PATCH, BADNETS_PATCH_FRACTION, BadNets, PatchTrigger, default_patch_size
from .quantization import BPP, floyd_steinberg, quantize
from .warp import WaNet

__all__ = [
    "ATTACKS", "ATTACK_ALIASES", "CLEAN_LABEL_ATTACKS", "ATTACK_OPTIONS", "DIGITS_ATTACK_OPTIONS",
    "MNIST_ATTACK_OPTIONS", "build_attack",
    "Attack", "CleanLabelAttack", "PoisonedSet", "ImageShape",
    "BadNets", "PatchTrigger", "Blended", "BPP", "LowFrequency", "SIG", "LabelConsistent", "WaNet", "InputAware",
    "poison_dataset", "poison_count", "choose_poison_indices", "choose_target_indices", "choose_cross_indices",
    "triggered_test_set", "quantize", "floyd_steinberg", "low_frequency_pattern", "corner_checkerboard_trigger",
    "pgd_away_from_labels", "diversity_loss", "default_patch_size", "BADNETS_PATCH_FRACTION", "BADNETS_MIN_PATCH",
]

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "bpp": BPP,
    "lf": LowFrequency,
    "sig": SIG,
    "lc": LabelConsistent,
    "wanet": WaNet,
    "input_aware": InputAware,
}
ATTACK_ALIASES = {"low_frequency": "lf", "label_consistent": "lc", "inputaware": "input_aware", "iad": "input_aware"}
CLEAN_LABEL_ATTACKS = tuple(name for name, cls in ATTACKS.items() if cls.clean_label)

# Options under which each attack implants on the 8x8 digits (pixels with only 17 grey levels; tiny images). The
# papers' defaults target 32x32 natural images: 3-bit BPP barely changes a digit, a 20/255 sinusoid or a 0.5 warp
# is too faint to learn in a few epochs. Measured at 10% poisoning, seed 0, 40 epochs (see the module report).
DIGITS_ATTACK_OPTIONS: dict[str, dict] = {
    "badnets": {},
    "blended": {},
    "bpp": {"bits": 1},
    "lf": {},
    "sig": {"delta": 0.3, "test_delta": 0.6},
    "lc": {},
    "wanet": {"strength": 2.0, "grid_size": 3, "cross_ratio": 1.0},
    "input_aware": {},
}

MNIST_ATTACK_OPTIONS: dict[str, dict] = {
    "badnets": {"patch_size": 3},
    "blended": {"alpha": 0.2},
    "bpp": {"bits": 3},
    "lf": {},
    "sig": {"delta": 40 / 255, "frequency": 6},
    "lc": {"surrogate_arch": "mnist_cnn"},
    "wanet": {"grid_size": 4, "strength": 0.5, "cross_ratio": 2.0},
    "input_aware": {"mask_density": 0.032},
}

ATTACK_OPTIONS: dict[str, dict[str, dict]] = {"digits": DIGITS_ATTACK_OPTIONS, "mnist": MNIST_ATTACK_OPTIONS}


def build_attack(name: str, image_shape: Sequence[int], **options) -> Attack:
    """Build an attack by name (``badnets``, ``blended``, ``bpp``, ``lf``, ``sig``, ``lc``, ``wanet``,
    ``input_aware``; also ``low_frequency``, ``label_consistent``, ``iad``); ``options`` go to its constructor."""
    key = str(name).lower().replace("-", "_")
    key = ATTACK_ALIASES.get(key, key)
    try:
        cls = ATTACKS[key]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}") from None
    return cls(image_shape, **options)
