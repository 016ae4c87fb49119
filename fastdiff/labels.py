"""Class labels of training data, and the null class of a class-conditional model.

Every data kind ``train()`` takes can carry labels (``resolve_labelled_data``):

* the built-in ``"digits"``: the digit 0..9 of each image (10 classes);
* a folder whose images all sit in subfolders: one class per top-level subfolder, numbered in
  sorted name order (torchvision's ImageFolder convention);
* an ``.npz`` with a ``labels`` array beside the images;
* a tensor / array with ``labels=`` (one per image);
* a map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``: its labels are read
  once, up front (from its ``targets`` attribute when it has one, else item by item).

Labels are validated before any work (:func:`check_labels`): integers, one per image, in
0..num_classes-1.

A class-conditional model with K classes takes labels y (B,) int64 in 0..K, where y == K is
the learned *null* class: the unconditional prediction of classifier-free guidance (Ho &
Salimans 2022).  Training replaces each label by K with probability ``class_dropout``
(:func:`drop_labels`).  Any ``nn.Module`` with ``forward(z, t, y)`` and an int attribute
``num_classes`` (or ``config["num_classes"]``) is such a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import DataError

#: The default probability that training replaces a label by the null class, chosen on the
#: digits at the default job's settings (docs/PERFORMANCE.md, "Classifier-free guidance"):
#: from 0.04 to 0.5 the null class's samples get steadily closer to an unconditional
#: model's, while guidance at the default scale still gives the asked-for class >= 99% of
#: the time; at 0.7 the conditional model falls behind.  denoising-diffusion-pytorch's
#: classifier-free-guidance Unet uses the same 0.5; Ho & Salimans use 0.1-0.2 on ImageNet.
DEFAULT_CLASS_DROPOUT = 0.5

__all__ = [
    "DEFAULT_CLASS_DROPOUT",
    "check_labels",
    "class_rows",
    "drop_labels",
    "folder_labels",
    "model_num_classes",
    "resolve_labelled_data",
]


def check_labels(labels, n: int, num_classes: int | None = None, *, name: str = "labels"):
    """``labels`` as an int64 CPU tensor (n,), after checking it holds one integer per image
    in 0..num_classes-1 (any value >= 0 when num_classes is None); else a DataError naming
    ``name``."""
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
    if isinstance(labels, np.ndarray):
        if labels.dtype == object:
            raise DataError(f"{name}: expected integer class labels, got objects")
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, torch.Tensor):
        raise DataError(
            f"{name}: expected a tensor, array or list of integer class labels, got"
            f" {type(labels).__name__}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"{name}: expected integer class labels, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise DataError(
            f"{name}: expected one label per image, shape ({n},), got {tuple(labels.shape)}"
        )
    labels = labels.detach().to("cpu", torch.int64)
    if n and int(labels.min()) < 0:
        raise DataError(f"{name}: expected labels >= 0, got {int(labels.min())}")
    if num_classes is not None and n and int(labels.max()) >= num_classes:
        raise DataError(
            f"{name}: expected labels in 0..{num_classes - 1} (num_classes={num_classes}),"
            f" got {int(labels.max())}"
        )
    return labels


def folder_labels(files: list[Path], root: Path) -> tuple[torch.Tensor, list[str]] | None:
    """ImageFolder labels of ``files`` under ``root``: the index of each file's top-level
    subfolder among the sorted subfolder names; None when any image sits in ``root`` itself
    (the folder then has no classes)."""
    parts = [f.relative_to(root).parts for f in files]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), classes


def _dataset_labels(dataset: Dataset) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return check_labels(targets, len(dataset), name="data: the Dataset's targets")
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise DataError(
                f"data: a conditional run needs Dataset items (image, label); item {i} is a"
                f" {type(item).__name__}" + (f" of length {len(item)}" if item else "")
            )
        label = item[1]
        if isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim == 0:
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise DataError(
                f"data: Dataset item {i} has label {label!r}; expected an integer class label"
            )
        labels.append(int(label))
    return check_labels(torch.tensor(labels, dtype=torch.int64), len(dataset), name="data")


def resolve_labelled_data(data, labels=None, *, image_size: int | None = None):
    """(source, labels, num_classes) for a conditional run; raise DataError before any work.

    ``source`` is what ``data.resolve_data`` gives (a tensor (N, C, H, W) in [-1, 1] or the
    Dataset), ``labels`` an int64 CPU tensor (N,), ``num_classes`` the number of classes: the
    built-in data set's or the folder's, else max(labels) + 1.  ``labels`` (the argument) is
    for tensor / array data only; every other kind carries its own.
    """
    from . import data as data_mod  # data imports nothing from here at module level

    if isinstance(data, Dataset):
        if labels is not None:
            raise DataError("labels: a Dataset yields its own (image, label) items; omit labels")
        data_mod.resolve_data(data, image_size=image_size)
        found = _dataset_labels(data)
        classes = getattr(data, "classes", None)
        num_classes = len(classes) if isinstance(classes, (list, tuple)) and classes else None
        found = check_labels(found, len(data), num_classes, name="data")
        return data, found, _count(found, num_classes)
    if isinstance(data, (str, Path)):
        if labels is not None:
            raise DataError(
                "labels: only for tensor / array data; a path carries its own labels (an .npz"
                " 'labels' array, a folder's class subfolders, the built-in digits)"
            )
        images, found, num_classes = data_mod.load_labelled_path(data, image_size=image_size)
        images = data_mod.resolve_data(images)
        found = check_labels(found, images.shape[0], num_classes, name="data")
        return images, found, _count(found, num_classes)
    images = data_mod.resolve_data(data, image_size=image_size)
    if labels is None:
        raise DataError(
            "labels: a conditional run on tensor / array data needs labels=... (one integer"
            " class per image)"
        )
    found = check_labels(labels, images.shape[0])
    return images, found, _count(found, None)


def _count(labels: torch.Tensor, num_classes: int | None) -> int:
    return num_classes if num_classes is not None else int(labels.max()) + 1


def model_num_classes(model: nn.Module) -> int | None:
    """The number of classes of a class-conditional model (``config["num_classes"]`` or an
    int attribute ``num_classes``), None for an unconditional one."""
    config = getattr(model, "config", None)
    value = config.get("num_classes") if isinstance(config, dict) else None
    if value is None:
        value = getattr(model, "num_classes", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model: num_classes must be a positive integer, got {value!r}")
    return value


def class_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: 0 (per_class times), 1, ..., K-1."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def drop_labels(
    y: torch.Tensor, p: float, null_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Classifier-free guidance's label dropout: y_i -> null_class with probability p, each
    independently, from ``generator`` (on y's device: no host sync, capturable)."""
    u = torch.rand(y.shape, device=y.device, generator=generator)
    return torch.where(u < p, torch.full_like(y, null_class), y)
