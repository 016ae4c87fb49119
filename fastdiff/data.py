"""Where training images come from: resolve a data argument, then serve batches.

:func:`resolve_data` turns whatever the user passed (tensor, array, .npz, image folder,
built-in name, Dataset) into a validated float32 tensor (N, C, H, W) in [-1, 1] -- or the
Dataset itself -- before any training starts.  :func:`make_batches` wraps the result in a
batch source with ``next_batch()`` and exact-resume ``state_dict()`` / ``load_state_dict()``:

* :class:`InMemoryBatches` -- the whole tensor lives on the device; one permutation per
  epoch, batches gathered with ``index_select`` (no host sync per step).
* :class:`StreamingBatches` -- a DataLoader over a Dataset (or a tensor too large for the
  device), with the epoch order derived from ``(seed, epoch)``.

Both use drop-last epochs: a partial batch at the end of an epoch is never served; the next
batch comes from a new permutation.
"""

from __future__ import annotations

import abc
import importlib.resources
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from .errors import CheckpointError, DataError
from .images import GRAYSCALE_MODES, list_image_files, load_image_folder, to_model_range
from .validation import require_int

__all__ = [
    "BUILTIN_DATASETS",
    "load_builtin",
    "resolve_data",
    "Batches",
    "InMemoryBatches",
    "StreamingBatches",
    "make_batches",
    "BATCH_KINDS",
]

#: Names accepted by :func:`load_builtin` (and as the ``data`` argument).
BUILTIN_DATASETS = ("digits",)

_BUILTIN_FILES = {"digits": "digits16.npz"}
_DEFAULT_IMAGE_SIZE = 32


# --------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------


def load_builtin(name: str = "digits") -> torch.Tensor:
    """A data set shipped inside the package -> float32 tensor in [-1, 1].

    ``"digits"``: scikit-learn's 1797 handwritten 8x8 digits (UCI, BSD-licensed) upscaled
    to 16x16, white on black: shape (1797, 1, 16, 16).  Works offline, from editable and
    normal installs (read with :mod:`importlib.resources`).
    """
    return _read_builtin(name)[0]


#: Classes of the built-in data sets (their labels are 0..K-1).
BUILTIN_NUM_CLASSES = {"digits": 10}


def _read_builtin(name: str) -> tuple[torch.Tensor, np.ndarray]:
    if name not in _BUILTIN_FILES:
        raise DataError(
            f"data: unknown built-in data set {name!r}; known: {', '.join(BUILTIN_DATASETS)}"
        )
    resource = importlib.resources.files("fastdiff.assets").joinpath(_BUILTIN_FILES[name])
    with resource.open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    return to_model_range(images, name=f"built-in {name!r}"), labels


def load_labelled_path(data, *, image_size: int | None = None):
    """(images, labels, num_classes or None) from a path or built-in name: the built-in
    data set's labels, an .npz's ``labels`` array, or an image folder's class subfolders
    (fastdiff.labels); a DataError naming the path when it has none."""
    from .labels import folder_labels

    path = Path(data)
    if not path.exists() and isinstance(data, str) and data in BUILTIN_DATASETS:
        images, labels = _read_builtin(data)
        return images, labels, BUILTIN_NUM_CLASSES[data]
    images = _load_path(data, image_size=image_size, channels=None)
    if path.is_dir():
        found = folder_labels(list_image_files(path), path)
        if found is None:
            raise DataError(
                f"data: folder {str(path)!r} has no class subfolders (images directly in it);"
                " a conditional run needs one subfolder per class"
            )
        return images, found[0], len(found[1])
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if "labels" in npz.files:
                return images, npz["labels"], None
    raise DataError(
        f"data: {str(path)!r} holds no labels; a conditional run needs an .npz with a"
        " 'labels' array, a folder with one subfolder per class, or arrays with labels=..."
    )


def resolve_data(
    data, *, image_size: int | None = None, channels: int | None = None
) -> torch.Tensor | Dataset:
    """Validate and load training data; raise :class:`DataError` before any work if unusable.

    ``data`` may be

    * a torch tensor or numpy array (N, C, H, W) -- float in [-1, 1] or uint8 0..255 -- or
      (N, H, W), which gets a channel dimension;
    * a path (str or Path) to an ``.npz`` (array ``images``, else ``x``, else its only array)
      or ``.npy`` file, same conventions as arrays;
    * a path to a folder of images (PNG/JPEG/BMP/WEBP, recursive): ``image_size`` defaults
      to the first image's size if it is square, else 32; ``channels`` defaults to 1 if all
      images are grayscale, else 3;
    * a built-in name from :data:`BUILTIN_DATASETS`, e.g. ``"digits"`` (an existing file or
      folder of that name takes precedence);
    * a map-style ``torch.utils.data.Dataset`` whose items are image tensors (C, H, W) or
      ``(image, label, ...)`` tuples -- returned as is after checking its first item.

    Returns a float32 tensor (N, C, H, W) in [-1, 1] (on the input tensor's device; CPU for
    files), or the Dataset.
    ``channels`` / ``image_size``, when given, must match the data (H == W == image_size).
    """
    if isinstance(data, Dataset):
        _check_dataset(data, image_size=image_size, channels=channels)
        return data
    if isinstance(data, (str, Path)):
        images = _load_path(data, image_size=image_size, channels=channels)
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        images = data
    else:
        raise DataError(
            "data: expected a tensor or array (N, C, H, W), a path to an .npz file or an "
            f"image folder, a built-in name ({', '.join(BUILTIN_DATASETS)}) or a "
            f"torch.utils.data.Dataset; got {type(data).__name__}"
        )
    return _check_images(images, image_size=image_size, channels=channels)


def _load_path(data, *, image_size, channels):
    path = Path(data)
    if not path.exists():
        if isinstance(data, str) and data in BUILTIN_DATASETS:
            return load_builtin(data)
        hint = ""
        if isinstance(data, str) and not path.suffix and len(path.parts) == 1:
            hint = f" and is not a built-in data set (known: {', '.join(BUILTIN_DATASETS)})"
        raise DataError(f"data: path {str(data)!r} does not exist{hint}")
    if path.is_dir():
        return _load_folder(path, image_size=image_size, channels=channels)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"data: cannot read {str(path)!r} as a .npy array: {err}") from err
    raise DataError(
        f"data: cannot use file {str(path)!r}; expected an .npz/.npy file or a folder of images"
    )


def _load_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            key = "images" if "images" in names else "x" if "x" in names else None
            if key is None and len(names) == 1:
                key = names[0]
            if key is None:
                raise DataError(
                    f"data: {str(path)!r} holds arrays {names}; expected one named 'images' "
                    "or 'x', or a single array"
                )
            return npz[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"data: cannot read {str(path)!r} as an .npz file: {err}") from err


def _load_folder(path: Path, *, image_size, channels) -> torch.Tensor:
    files = list_image_files(path)
    if files and image_size is None:
        width, height = _peek(files[0]).size
        image_size = width if width == height else _DEFAULT_IMAGE_SIZE
    if files and channels is None:
        channels = 1 if all(_peek(f).mode in GRAYSCALE_MODES for f in files) else 3
    if channels not in (None, 1, 3):
        raise DataError(f"channels: expected 1 or 3 for an image folder, got {channels!r}")
    # With no files, load_image_folder raises the "holds no images" error.
    return load_image_folder(path, image_size or _DEFAULT_IMAGE_SIZE, channels or 3)


def _peek(file: Path) -> Image.Image:
    """Open an image lazily (header only) to read its size and mode."""
    try:
        with Image.open(file) as im:
            return im
    except OSError as err:
        raise DataError(f"data: cannot read image {str(file)!r}: {err}") from err


def _check_images(images, *, image_size, channels) -> torch.Tensor:
    shape = tuple(images.shape)
    if len(shape) == 3:
        images = images[:, None]
        shape = tuple(images.shape)
    if len(shape) != 4:
        raise DataError(
            f"data: expected images of shape (N, C, H, W) or (N, H, W), got shape {shape}"
        )
    if shape[0] == 0:
        raise DataError(f"data: expected at least one image, got shape {shape}")
    if channels is not None and shape[1] != channels:
        raise DataError(
            f"data: expected {channels} channel(s) (shape (N, {channels}, H, W)), got shape "
            f"{shape}" + (" -- channels-last (N, H, W, C) data?" if shape[3] == channels else "")
        )
    if image_size is not None and shape[2:] != (image_size, image_size):
        raise DataError(
            f"data: expected {image_size}x{image_size} images (image_size={image_size}), "
            f"got shape {shape}"
        )
    return to_model_range(images, name="data")


def _check_dataset(dataset: Dataset, *, image_size, channels) -> None:
    if isinstance(dataset, IterableDataset):
        raise DataError("data: an IterableDataset is not supported; pass a map-style Dataset")
    try:
        n = len(dataset)
    except TypeError as err:
        raise DataError("data: the Dataset must define __len__") from err
    if n < 1:
        raise DataError("data: the Dataset is empty; expected at least one image")
    image = _item_image(dataset[0])
    if image.dim() != 3:
        raise DataError(
            f"data: Dataset items must be images (C, H, W) or (image, label) tuples; "
            f"item 0 has shape {tuple(image.shape)}"
        )
    _check_images(image[None], image_size=image_size, channels=channels)


def _item_image(item) -> torch.Tensor:
    """The image of one Dataset item or batch: the item itself or the first of a tuple."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor):
        raise DataError(
            "data: Dataset items must be tensors/arrays (C, H, W) or (image, label) tuples, "
            f"got {type(item).__name__}"
        )
    return item


# --------------------------------------------------------------------------------------
# Batch sources
# --------------------------------------------------------------------------------------


class Batches(abc.ABC):
    """Infinite source of training batches (B, C, H, W) float32 in [-1, 1] on ``device``.

    ``next_batch()`` (or ``next(batches)``) returns the next batch, ``next_labelled()`` the
    next batch and its class labels (B,) int64 on ``device`` (None for unlabelled data);
    ``state_dict()`` and
    ``load_state_dict()`` save and restore the position so a resumed run sees exactly the
    batches the uninterrupted run would have seen.
    """

    batch_size: int
    device: torch.device
    num_images: int
    image_shape: tuple[int, int, int]

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, C, H, W) batch."""
        return self.next_labelled()[0]

    @abc.abstractmethod
    def next_labelled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch and its labels (batch_size,) int64 (None: unlabelled data)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """The position in the batch stream, for exact resume."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by ``state_dict``."""

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def _check_state(self, state: dict, kind: str) -> None:
        if state.get("kind") != kind:
            raise CheckpointError(
                f"data state: saved by {state.get('kind')!r} batches, cannot load into {kind!r}"
            )
        for key, mine in (("num_images", self.num_images), ("batch_size", self.batch_size)):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"data state: saved with {key}={state.get(key)}, but this run has "
                    f"{key}={mine}; resuming would not reproduce the batch order"
                )


class InMemoryBatches(Batches):
    """Batches from an (N, C, H, W) tensor held entirely on ``device``.

    Each epoch draws a permutation of 0..N-1 from a CPU ``torch.Generator`` seeded with
    ``seed``, moves it to the device once, and serves consecutive slices of it through
    ``index_select`` -- no host-device sync per step.  Drop-last: when fewer than
    ``batch_size`` indices remain, a new permutation starts.

    If N < batch_size, an epoch is the concatenation of ``ceil(batch_size / N)`` independent
    permutations, so each batch holds every image ``floor(B / N)`` or ``ceil(B / N)`` times
    (and the epoch serves one batch).

    ``data`` may be float in [-1, 1] or uint8; it is stored as float32, contiguous.
    ``labels`` (N,) int64, if given, are stored on the device beside it.
    """

    kind = "in_memory"

    def __init__(self, data: torch.Tensor, batch_size: int, device, *, seed: int = 0, labels=None):
        _check_batch_size(batch_size)
        self.device = torch.device(device)
        self.data = to_model_range(data.to(self.device), name="data").contiguous()
        if self.data.dim() != 4 or self.data.shape[0] < 1:
            raise DataError(f"data: expected (N, C, H, W) with N >= 1, got {tuple(data.shape)}")
        self.batch_size = batch_size
        self.num_images = self.data.shape[0]
        self.image_shape = tuple(self.data.shape[1:])
        self.labels = None if labels is None else labels.to(self.device, torch.int64)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._perm: torch.Tensor | None = None  # on device
        self._pos = 0

    def _new_epoch(self) -> None:
        perm = _epoch_permutation(self.num_images, self.batch_size, self.generator)
        self._perm = perm.to(self.device, non_blocking=True)
        self._pos = 0

    def next_labelled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next (batch_size, C, H, W) float32 batch on the device and its labels."""
        perm, start = self.next_indices()
        index = perm[start : start + self.batch_size]
        labels = None if self.labels is None else self.labels.index_select(0, index)
        return self.data.index_select(0, index), labels

    def next_indices(self) -> tuple[torch.Tensor, int]:
        """Advance by one batch without gathering it: the epoch's permutation (on the device)
        and the batch's start in it; the batch is ``data[perm[start : start + batch_size]]``.
        (A captured training step gathers it on the device: fastdiff.train_graph.)"""
        if self._perm is None or self._pos + self.batch_size > self._perm.numel():
            self._new_epoch()
        start = self._pos
        self._pos += self.batch_size
        return self._perm, start

    def state_dict(self) -> dict:
        """Generator state, current permutation (CPU int64) and position within it."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
            "generator": self.generator.get_state(),
            "perm": None if self._perm is None else self._perm.cpu(),
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the run that wrote ``state`` was."""
        self._check_state(state, self.kind)
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        perm = state["perm"]
        self._perm = None if perm is None else perm.to(self.device, torch.int64)
        self._pos = int(state["pos"])


class _EpochSampler(Sampler[int]):
    """Index order for one epoch, a pure function of (seed, epoch); can start mid-epoch."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
        return _epoch_permutation(self.num_images, self.batch_size, generator)

    def __iter__(self):
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, _epoch_length(self.num_images, self.batch_size) - self.start)


class _TensorImages(Dataset):
    """A CPU tensor (and its labels) as a Dataset; ``__getitems__`` gathers a whole batch in
    one op: the images, or the tuple (images, labels)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images.index_select(0, index)
        return images if self.labels is None else (images, self.labels.index_select(0, index))


def _collate_tensor_batch(batch):
    return batch if isinstance(batch, (torch.Tensor, tuple)) else default_collate(batch)


class StreamingBatches(Batches):
    """Batches streamed through a ``DataLoader`` from a Dataset or a (large) CPU tensor.

    Items may be image tensors/arrays (C, H, W) or ``(image, label, ...)`` tuples (the image
    is used); uint8 images become float32 in [-1, 1] after the transfer to ``device``
    (``non_blocking=True``; memory is pinned when the device is CUDA).  Iteration is
    infinite over drop-last epochs; epoch ``e`` visits the images in an order that depends
    only on ``(seed, e)`` (a shorter-than-a-batch data set repeats as in
    :class:`InMemoryBatches`).  ``state_dict()`` records ``(seed, epoch, batches consumed)``;
    ``load_state_dict`` rebuilds that epoch's order and starts the sampler after the consumed
    batches, without loading them.
    """

    kind = "streaming"

    def __init__(
        self,
        data,
        batch_size: int,
        device,
        *,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        labels: torch.Tensor | None = None,
    ):
        _check_batch_size(batch_size)
        self.device = torch.device(device)
        if isinstance(data, torch.Tensor):
            data = _TensorImages(data.detach().cpu(), None if labels is None else labels.cpu())
            collate = _collate_tensor_batch
        else:
            _check_dataset(data, image_size=None, channels=None)
            collate = default_collate
        self.dataset = data
        self.batch_size = batch_size
        self.num_images = len(data)
        self.image_shape = tuple(_item_image(data[0]).shape)
        self.seed = seed
        self.epoch = 0
        self.consumed = 0  # batches served in the current epoch
        self.sampler = _EpochSampler(self.num_images, batch_size, seed)
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        self.loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self._iterator = None

    def next_labelled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next (batch_size, C, H, W) float32 batch on the device, and its labels when
        the items are (image, label, ...) tuples."""
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch, self.consumed * self.batch_size)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                break
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                self.consumed = 0
        self.consumed += 1
        labels = None
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            labels = torch.as_tensor(batch[1]).to(self.device, torch.int64, non_blocking=True)
        images = _item_image(batch).to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            return images.to(torch.float32).div_(127.5).sub_(1.0), labels
        return images.to(torch.float32), labels

    def state_dict(self) -> dict:
        """Seed, epoch and the number of batches consumed in that epoch."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "consumed": self.consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the run that wrote ``state`` was."""
        self._check_state(state, self.kind)
        self.seed = self.sampler.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._iterator = None


#: The kinds of batch source, as ``Batches.state_dict()["kind"]`` names them.
BATCH_KINDS = ("in_memory", "streaming")


def make_batches(
    data,
    batch_size: int,
    device,
    *,
    seed: int = 0,
    num_workers: int = 0,
    max_device_bytes: int | None = None,
    labels: torch.Tensor | None = None,
    kind: str | None = None,
) -> Batches:
    """Pick a batch source for ``data`` (anything :func:`resolve_data` accepts), with
    ``labels`` (N,) for tensor data (fastdiff.labels; a Dataset yields its own).

    A tensor whose float32 size is at most ``max_device_bytes`` -- by default 25% of the free
    memory on a CUDA device (``torch.cuda.mem_get_info``), unlimited on other devices -- gets
    :class:`InMemoryBatches`; a larger tensor or a Dataset gets :class:`StreamingBatches`.
    ``kind`` (one of BATCH_KINDS) forces the choice for tensor data: a resumed run takes the
    kind its checkpoint was saved by, whatever the free memory is now (the two kinds draw
    different batches, so exact resume needs the same one).
    """
    _check_batch_size(batch_size)
    if kind is not None and kind not in BATCH_KINDS:
        raise ValueError(f"kind: expected one of {BATCH_KINDS} or None, got {kind!r}")
    if not isinstance(data, Dataset):
        data = resolve_data(data)  # validates tensors too; float32 input is not copied
    device = torch.device(device)
    if isinstance(data, Dataset):
        return StreamingBatches(data, batch_size, device, seed=seed, num_workers=num_workers)
    limit = max_device_bytes
    if limit is None and kind is None:
        limit = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else math.inf
    if kind == "in_memory" or (kind is None and data.numel() * 4 <= limit):
        return InMemoryBatches(data, batch_size, device, seed=seed, labels=labels)
    return StreamingBatches(
        data, batch_size, device, seed=seed, num_workers=num_workers, labels=labels
    )


def _epoch_length(num_images: int, batch_size: int) -> int:
    """Indices per epoch: N, or whole repeats of N covering one batch when N < batch_size."""
    return -(-batch_size // num_images) * num_images if num_images < batch_size else num_images


def _epoch_permutation(num_images: int, batch_size: int, generator) -> torch.Tensor:
    """One epoch's order: ceil(batch_size / N) independent permutations (1 when N >= B)."""
    repeats = _epoch_length(num_images, batch_size) // num_images
    perms = [torch.randperm(num_images, generator=generator) for _ in range(repeats)]
    return torch.cat(perms)


def _check_batch_size(batch_size) -> None:
    require_int("batch_size", batch_size)
