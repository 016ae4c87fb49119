"""Data sources, validation errors, exact-resume batch sources and image grids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from fastdiff.data import (
    BUILTIN_DATASETS,
    InMemoryBatches,
    StreamingBatches,
    load_builtin,
    make_batches,
    resolve_data,
)
from fastdiff.errors import CheckpointError, DataError
from fastdiff.images import load_image_folder, make_grid, save_image_grid, to_model_range, to_uint8


def _uint8_images(n=6, c=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ----------------------------------------------------------------------------- sources


def test_float_tensor_passes_through():
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    out = resolve_data(x)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 8, 8)
    torch.testing.assert_close(out, x)


def test_uint8_tensor_and_array_map_to_model_range():
    raw = _uint8_images()
    for data in (raw, torch.from_numpy(raw)):
        out = resolve_data(data)
        assert out.dtype == torch.float32 and out.shape == raw.shape
        torch.testing.assert_close(out, torch.from_numpy(raw).float() / 127.5 - 1)
    edges = resolve_data(np.array([0, 255], dtype=np.uint8).reshape(1, 1, 1, 2))
    assert edges.flatten().tolist() == [-1.0, 1.0]
    assert torch.equal(to_uint8(resolve_data(raw)), torch.from_numpy(raw))  # lossless


def test_float64_array_and_3d_array_get_channel_dim():
    arr = np.linspace(-1, 1, 4 * 6 * 6).reshape(4, 6, 6)
    out = resolve_data(arr)
    assert out.shape == (4, 1, 6, 6) and out.dtype == torch.float32


def test_npz_file(tmp_path):
    raw = _uint8_images(n=4, c=1)
    for key in ("images", "x", "whatever"):
        path = tmp_path / f"{key}.npz"
        np.savez_compressed(path, **{key: raw})
        out = resolve_data(str(path))
        assert out.shape == (4, 1, 8, 8) and out.min() >= -1 and out.max() <= 1
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=raw.astype(np.float32) / 127.5 - 1, labels=np.arange(4))
    torch.testing.assert_close(resolve_data(floats), resolve_data(raw))


def _write_images(folder, specs):
    """specs: (relative path, mode, (w, h)); returns the written pixel arrays."""
    rng = np.random.default_rng(1)
    for rel, mode, (w, h) in specs:
        shape = (h, w) if mode == "L" else (h, w, 3)
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_folder_grayscale_keeps_square_size(tmp_path):
    _write_images(tmp_path, [("a.png", "L", (12, 12)), ("sub/b.jpg", "L", (12, 12))])
    out = resolve_data(tmp_path)
    assert out.shape == (2, 1, 12, 12) and out.dtype == torch.float32
    assert -1 <= out.min() and out.max() <= 1


def test_folder_rgb_mixed_sizes_resized(tmp_path):
    _write_images(
        tmp_path,
        [
            ("1.png", "RGB", (20, 10)),  # first image not square -> default size 32
            ("2.jpeg", "L", (40, 40)),
            ("d/3.bmp", "RGB", (7, 9)),
            ("4.webp", "RGB", (16, 16)),
        ],
    )
    (tmp_path / "notes.txt").write_text("not an image")
    out = resolve_data(str(tmp_path))
    assert out.shape == (4, 3, 32, 32)  # one RGB image -> 3 channels for all
    out = resolve_data(tmp_path, image_size=8, channels=1)
    assert out.shape == (4, 1, 8, 8)


def test_folder_center_crop(tmp_path):
    pixels = np.zeros((10, 30), dtype=np.uint8)
    pixels[:, 10:20] = 255  # white centre square, black sides
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = load_image_folder(tmp_path, image_size=10, channels=1)
    assert out.shape == (1, 1, 10, 10) and out.dtype == torch.uint8
    assert int(out.min()) == 255


def test_builtin_digits():
    assert "digits" in BUILTIN_DATASETS
    for x in (load_builtin("digits"), resolve_data("digits")):
        assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
        assert x.min() == -1.0 and x.max() == 1.0
    assert load_builtin().mean() < 0  # white digits on a black background


class _TupleDataset(Dataset):
    def __init__(self, n=10):
        self.images = torch.from_numpy(_uint8_images(n=n, c=1, h=4, w=4))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def test_dataset_of_tuples_streams():
    ds = _TupleDataset()
    assert resolve_data(ds, channels=1) is ds
    batches = make_batches(ds, 4, "cpu")
    assert isinstance(batches, StreamingBatches)
    for _ in range(5):  # crosses epochs (2 batches per epoch, drop-last)
        b = batches.next_batch()
        assert b.shape == (4, 1, 4, 4) and b.dtype == torch.float32 and b.device.type == "cpu"
        assert -1 <= b.min() and b.max() <= 1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        ("/no/such/dir/images.npz", {}, "does not exist"),
        ("digitz", {}, "not a built-in data set.*digits"),
        (torch.full((2, 1, 4, 4), float("nan")), {}, "NaN"),
        (torch.tensor([1.0, float("inf")]).reshape(1, 1, 1, 2), {}, "inf"),
        (torch.full((2, 1, 4, 4), 3.0), {}, r"\[-1, 1\].*3"),
        (torch.zeros(2, 4), {}, "shape"),
        (torch.zeros(2, 1, 4, 4, 1), {}, "shape"),
        (torch.zeros(0, 1, 4, 4), {}, "at least one"),
        (torch.zeros(2, 1, 4, 4), {"channels": 3}, "3 channel"),
        (torch.zeros(2, 1, 4, 4), {"image_size": 8}, "8x8"),
        (np.array([[[[300]]]], dtype=np.int64), {}, "0..255"),
        ([1, 2, 3], {}, "got list"),
    ],
)
def test_bad_data_raises_data_error(data, kwargs, match):
    with pytest.raises(DataError, match=match) as info:
        resolve_data(data, **kwargs)
    assert str(info.value).startswith("data")


def test_empty_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="holds no images") as info:
        resolve_data(tmp_path)
    assert str(tmp_path) in str(info.value)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        resolve_data(tmp_path)
    npz = tmp_path / "two.npz"
    np.savez(npz, a=np.zeros(1), b=np.zeros(1))
    with pytest.raises(DataError, match="'images'"):
        resolve_data(npz)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        resolve_data(junk)
    with pytest.raises(DataError, match="expected an .npz"):
        resolve_data(tmp_path / "broken.png")


def test_unknown_builtin_lists_known_names():
    with pytest.raises(DataError, match="known: digits"):
        load_builtin("cifar")


def test_bad_dataset_item():
    ds = TensorDataset(torch.zeros(3, 4))  # items are 1-D
    with pytest.raises(DataError, match="item 0"):
        resolve_data(ds)


def test_batch_size_validated():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            make_batches(torch.zeros(4, 1, 2, 2), bad, "cpu")


def test_to_model_range_names_argument():
    with pytest.raises(DataError, match="^pixels: .*range"):
        to_model_range(torch.full((2,), -2.0), name="pixels")
    x = torch.tensor([-1.0005, 1.0005])  # within tolerance
    assert to_model_range(x) is not None


# ----------------------------------------------------------------------------- batches


def _draw(batches, k):
    return [batches.next_batch().clone() for _ in range(k)]


@pytest.mark.parametrize("n", [10, 3])  # 3 < batch_size: permutations are concatenated
def test_in_memory_resume_is_exact(n):
    data = torch.arange(n, dtype=torch.float32).div(n).reshape(n, 1, 1, 1).expand(n, 1, 2, 2)
    first = InMemoryBatches(data, 4, "cpu", seed=7)
    _draw(first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint would
    expected = _draw(first, 6)
    second = InMemoryBatches(data, 4, "cpu", seed=123)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(expected, _draw(second, 6), strict=True):
        assert torch.equal(a, b)


def test_in_memory_epochs_cover_data_and_shapes():
    n = 10
    data = torch.arange(n, dtype=torch.float32).div(n).reshape(n, 1, 1, 1)
    batches = make_batches(data, 5, torch.device("cpu"), seed=0)
    assert isinstance(batches, InMemoryBatches)
    epoch = torch.cat(_draw(batches, 2)).flatten().mul(n).round().long()
    assert sorted(epoch.tolist()) == list(range(n))  # one epoch = one permutation
    b = next(iter(batches))
    assert b.shape == (5, 1, 1, 1) and b.dtype == torch.float32 and b.device.type == "cpu"
    small = InMemoryBatches(data[:3], 7, "cpu")
    counts = torch.bincount(small.next_batch().flatten().mul(n).round().long(), minlength=3)
    assert sorted(counts.tolist()) == [2, 2, 3]  # each image floor/ceil(7 / 3) times


def test_in_memory_rejects_foreign_state():
    data = torch.zeros(10, 1, 2, 2)
    state = InMemoryBatches(data, 4, "cpu").state_dict()
    with pytest.raises(CheckpointError, match="batch_size"):
        InMemoryBatches(data, 5, "cpu").load_state_dict(state)
    with pytest.raises(CheckpointError, match="streaming"):
        StreamingBatches(data, 4, "cpu").load_state_dict(state)


@pytest.mark.parametrize("k", [0, 2, 3, 5])  # 3 = exactly at the end of an epoch
def test_streaming_resume_is_exact(k):
    ds = _TupleDataset(n=13)  # 3 batches of 4 per epoch, 1 image dropped
    first = StreamingBatches(ds, 4, "cpu", seed=3)
    _draw(first, k)
    state = first.state_dict()
    expected = _draw(first, 5)
    second = StreamingBatches(ds, 4, "cpu", seed=99)
    second.load_state_dict(state)
    for a, b in zip(expected, _draw(second, 5), strict=True):
        assert torch.equal(a, b)


def test_streaming_tensor_and_make_batches_threshold():
    data = torch.rand(9, 1, 4, 4) * 2 - 1
    batches = make_batches(data, 4, "cpu", max_device_bytes=data.numel())  # too small
    assert isinstance(batches, StreamingBatches)
    seen = torch.cat(_draw(batches, 2))
    assert seen.shape == (8, 1, 4, 4)
    # Every served row is one of the images, each at most once per epoch.
    matches = (seen[:, None] == data[None]).flatten(2).all(-1).sum(0)
    assert matches.max() == 1 and matches.sum() == 8


# ----------------------------------------------------------------------------- grids


def test_save_image_grid(tmp_path):
    images = torch.rand(10, 1, 16, 16) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", scale=2)
    # nrow = ceil(sqrt(10)) = 4 -> 4 columns, 3 rows of 32x32 tiles with 2 px padding
    with Image.open(path) as im:
        assert im.size == (4 * 34 + 2, 3 * 34 + 2) and im.mode == "L"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp files left
    rgb = make_grid(torch.rand(3, 3, 5, 5) * 2 - 1, nrow=3, padding=0)
    assert rgb.shape == (5, 15, 3) and rgb.dtype == np.uint8
    save_image_grid(torch.rand(3, 3, 5, 5) * 2 - 1, tmp_path / "rgb.png", nrow=1)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.size == (1 * 7 + 2, 3 * 7 + 2) and im.mode == "RGB"


def test_streaming_with_workers_resumes_exactly():
    ds = _TupleDataset(n=10)
    first = StreamingBatches(ds, 3, "cpu", seed=5, num_workers=2)
    _draw(first, 4)  # into the second epoch
    state = first.state_dict()
    expected = _draw(first, 4)
    first.load_state_dict(state)  # rewinding a live, persistent-worker loader works too
    for a, b in zip(expected, _draw(first, 4), strict=True):
        assert torch.equal(a, b)
    single = StreamingBatches(ds, 3, "cpu", seed=5)  # same order without workers
    single.load_state_dict(state)
    for a, b in zip(expected, _draw(single, 4), strict=True):
        assert torch.equal(a, b)
