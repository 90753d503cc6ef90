"""Checks of what a caller hands to ``purify``, made before any work: each problem is named with its fix instead
of surfacing later as a raw torch error or, worse, as a wrong result blamed on something else."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .training import all_finite


def check_model(model: Any) -> None:
    """An nn.Module with parameters, materialised (not on the meta device), with finite weights and buffers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = list(model.parameters()) + list(model.buffers())
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to purify")
    if any(t.is_meta for t in tensors):
        raise ValueError(f"{type(model).__name__}'s weights are on the meta device (never loaded): load real "
                         "weights first (model.to_empty(device=...) then load_state_dict)")
    if not all_finite(tensors):
        bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        raise ValueError(f"the model's weights hold NaN or inf values ({', '.join(bad[:5])}): the checkpoint is "
                         "damaged or the training that made it diverged")


def check_clean_data(data: Any) -> None:
    """A map-style Dataset of (x, y) examples or a batching DataLoader over one."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        raise TypeError("clean_data is an (x, y) pair of tensors: wrap it as torch.utils.data.TensorDataset(x, y)")
    if isinstance(data, DataLoader):
        if data.batch_size is None and data.batch_sampler is None:
            raise ValueError("clean_data is a DataLoader without batching (batch_size=None): give it a batch_size")
        if isinstance(data.dataset, IterableDataset):
            raise TypeError("clean_data's DataLoader reads an IterableDataset: TSC passes over the data several "
                            "times and needs its size; use a map-style Dataset")
        return
    if isinstance(data, IterableDataset):
        raise TypeError("clean_data is an IterableDataset: TSC needs a map-style Dataset (with __len__ and "
                        "__getitem__) or a DataLoader over one")
    if not isinstance(data, Dataset) and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"clean_data must be a torch Dataset or DataLoader, got {type(data).__name__}")


def first_batch(batches: Iterable[Any]) -> Any:
    """The first batch, or a clear error when the loader yields none."""
    try:
        return next(iter(batches))
    except StopIteration:
        raise ValueError("the clean data yield no batch (an empty dataset, or a DataLoader with drop_last=True "
                         "and fewer examples than one batch)") from None


def dataset_labels_if_cheap(data: Any) -> torch.Tensor | None:
    """Every label of a TensorDataset (or a DataLoader over one), where reading them costs nothing."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    return None


def check_batch(model: nn.Module, batch: Any, inputs: Any, device, default_loss: bool,
                all_labels: torch.Tensor | None = None) -> None:
    """Finite inputs; for the default cross-entropy, integer labels (``all_labels``, else the batch's) in the
    range of the model's outputs."""
    if torch.is_tensor(inputs) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("the clean data hold NaN or inf values: clean or drop those examples")
    if not default_loss:
        return
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not torch.is_tensor(batch[1]):
        raise ValueError("with the default cross-entropy loss, clean batches must be (x, y) with a label tensor y; "
                         "pass loss_fn for unlabelled data (e.g. a contrastive loss)")
    labels = all_labels if all_labels is not None else batch[1]
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            outputs = model(inputs[:2].to(device) if torch.is_tensor(inputs) else inputs)
        finally:
            model.train(was_training)
    classes = outputs.shape[-1] if torch.is_tensor(outputs) and outputs.dim() >= 2 else None
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (classes is not None and high >= classes):
        raise ValueError(f"labels range over {low}..{high}, but the model has {classes} outputs: the data and the "
                         "model disagree on the classes (check the label mapping or --num-classes)")
