"""Backdoor benchmarking: datasets, attacks, victim training, metrics and the package's models."""
from .attacks import Attack, BadNets, Blended, build_attack, poison_dataset
from .data import DatasetSplits, clean_subset, load_dataset, load_digits_split, to_tensors
from .metrics import evaluate
from .models import MLP, DigitsCNN, PreActResNet18, build_model
from .train import BackdoorSetup, build_classifier, make_backdoored_digits, train_classifier

__all__ = ["Attack", "BadNets", "Blended", "build_attack", "poison_dataset", "DatasetSplits", "clean_subset",
           "load_dataset", "load_digits_split", "to_tensors", "evaluate", "MLP", "DigitsCNN", "PreActResNet18",
           "build_model", "BackdoorSetup", "build_classifier", "make_backdoored_digits", "train_classifier"]
