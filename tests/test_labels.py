"""Class labels from every data kind train() takes, and their validation (fastdiff.labels)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import fastdiff
from fastdiff.data import make_batches
from fastdiff.errors import DataError
from fastdiff.labels import check_labels, resolve_labelled_data

TINY = dict(preset="tiny", T=10, device="cpu", progress=False, warmup_steps=1, steps=1,
            batch_size=2, precision="fp32", channels_last=False)  # fmt: skip
NO_PRESET = {k: v for k, v in TINY.items() if k != "preset"}


def test_builtin_digits_carry_their_labels():
    with np.load("fastdiff/assets/digits16.npz") as f:
        want = torch.from_numpy(f["labels"].astype(np.int64))
    images, labels, k = resolve_labelled_data("digits")
    assert images.shape == (1797, 1, 16, 16) and k == 10
    assert torch.equal(labels, want) and torch.equal(labels.unique(), torch.arange(10))


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_folder_subfolders_are_classes_in_sorted_order(tmp_path):
    """ImageFolder: classes numbered by sorted subfolder name, nested files count for their
    top-level subfolder."""
    _png(tmp_path / "zebra" / "a.png", 10)
    _png(tmp_path / "ant" / "x" / "b.png", 20)
    _png(tmp_path / "ant" / "c.png", 30)
    _png(tmp_path / "moth" / "d.png", 40)
    images, labels, k = resolve_labelled_data(tmp_path)
    assert k == 3
    # files in sorted path order: ant/c, ant/x/b, moth/d, zebra/a
    assert labels.tolist() == [0, 0, 1, 2]
    assert images[:, 0, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in (30, 20, 40, 10)])
    _png(tmp_path / "loose.png", 0)
    with pytest.raises(DataError, match="no class subfolders"):
        resolve_labelled_data(tmp_path)


def test_npz_labels_array(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (5, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([3, 0, 1, 3, 2]))
    images, labels, k = resolve_labelled_data(tmp_path / "d.npz")
    assert labels.tolist() == [3, 0, 1, 3, 2] and k == 4 and images.shape == (5, 1, 8, 8)
    np.savez(tmp_path / "e.npz", images=x)
    with pytest.raises(DataError, match="holds no labels"):
        resolve_labelled_data(tmp_path / "e.npz")


def test_arrays_and_tensors_with_labels_keyword():
    x = torch.zeros(4, 1, 8, 8)
    for labels in ([1, 0, 2, 1], np.array([1, 0, 2, 1], np.uint8), torch.tensor([1, 0, 2, 1])):
        _, got, k = resolve_labelled_data(x, labels)
        assert got.tolist() == [1, 0, 2, 1] and got.dtype == torch.int64 and k == 3


class Pairs(Dataset):
    def __init__(self, labels, targets=False):
        self.labels = labels
        if targets:
            self.targets = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(1, 8, 8), self.labels[i]


@pytest.mark.parametrize("targets", [False, True])
def test_dataset_of_image_label_pairs(targets):
    ds = Pairs([2, torch.tensor(0), np.int64(1)] if not targets else [2, 0, 1], targets)
    source, labels, k = resolve_labelled_data(ds)
    assert source is ds and labels.tolist() == [2, 0, 1] and k == 3
    batches = make_batches(ds, 3, "cpu", labels=labels)
    x, y = batches.next_labelled()
    assert sorted(y.tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0.0, 1.0, 1.0, 0.0], "expected integer class labels, got dtype torch.float"),
        ([0, 1, 1], r"expected one label per image, shape \(4,\), got \(3,\)"),
        ([[0, 1, 1, 0]], r"expected one label per image, shape \(4,\), got \(1, 4\)"),
        ([0, -1, 1, 0], "expected labels >= 0, got -1"),
        ([True, False, True, False], "expected integer class labels, got dtype torch.bool"),
        ("0110", "expected a tensor, array or list"),
    ],
)
def test_bad_labels_are_refused_naming_the_argument(labels, match):
    with pytest.raises(DataError, match="labels: " + match):
        fastdiff.train(torch.zeros(4, 1, 8, 8), conditional=True, labels=labels, **TINY)


def test_labels_beyond_the_models_classes_are_refused():
    model = fastdiff.UNet.preset("tiny", num_classes=3)
    with pytest.raises(DataError, match=r"data: expected labels in 0..2 \(num_classes=3\), got 3"):
        fastdiff.train(torch.zeros(4, 1, 8, 8), model, conditional=True, labels=[0, 1, 2, 3],
                       **NO_PRESET)  # fmt: skip
    assert check_labels([0, 2], 2, 3).tolist() == [0, 2]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(labels=[0, 1, 0, 1]), ValueError, "labels: only used by a conditional run"),
        (dict(conditional=True), DataError, "labels: a conditional run on tensor"),
        (dict(conditional=True, labels=[0, 1, 0, 1], class_dropout=1.5), ValueError,
         "class_dropout: expected a probability"),
        (dict(conditional=1, labels=[0, 1, 0, 1]), TypeError, "conditional: expected True"),
    ],
)  # fmt: skip
def test_conditional_arguments_are_checked_before_work(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdiff.train(torch.zeros(4, 1, 8, 8), **kwargs, **TINY)


def test_path_data_takes_no_labels_keyword_and_unconditional_models_are_refused(tmp_path):
    with pytest.raises(DataError, match="labels: only for tensor / array data"):
        fastdiff.train("digits", conditional=True, labels=[0], **TINY)
    with pytest.raises(ValueError, match="model: a conditional run needs a class-conditional"):
        fastdiff.train(torch.zeros(4, 1, 8, 8), fastdiff.UNet.preset("tiny"), conditional=True,
                       labels=[0, 1, 0, 1], **NO_PRESET)  # fmt: skip
