"""Backdoor benchmarking: datasets, attacks, victim training, metrics and the package's models."""
from .attacks import (BPP, DIGITS_ATTACK_OPTIONS, SIG, Attack, BadNets, Blended, InputAware, LabelConsistent,
                      LowFrequency, PoisonedSet, WaNet, build_attack, poison_dataset)
from .backdoorbench import BackdoorBenchResult, import_backdoorbench
from .data import DatasetSplits, clean_subset, load_dataset, load_digits_split, to_tensors
from .datasets_local import DatasetLayoutError, load_cifar10, load_gtsrb, load_image_folders
from .metrics import evaluate
from .models import MLP, DigitsCNN, PreActResNet18, build_model
from .train import BackdoorSetup, build_classifier, make_backdoored_digits, train_classifier

__all__ = ["BPP", "DIGITS_ATTACK_OPTIONS", "SIG", "InputAware", "LabelConsistent", "LowFrequency", "PoisonedSet",
           "WaNet", "BackdoorBenchResult", "import_backdoorbench", "DatasetLayoutError", "load_cifar10",
           "load_gtsrb", "load_image_folders", "Attack", "BadNets", "Blended", "build_attack", "poison_dataset", "DatasetSplits", "clean_subset",
           "load_dataset", "load_digits_split", "to_tensors", "evaluate", "MLP", "DigitsCNN", "PreActResNet18",
           "build_model", "BackdoorSetup", "build_classifier", "make_backdoored_digits", "train_classifier"]
