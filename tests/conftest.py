"""Shared test set-up.

Without a GPU, the Triton kernels run under the interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 before anything imports triton.  With a GPU, the kernel tests run the
compiled kernels on CUDA tensors instead (helpers.DEVICE).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _share_cores_between_xdist_workers() -> None:
    """Under pytest-xdist, give each worker (and the processes it starts, through
    OMP_NUM_THREADS) its share of the cores: N workers each running torch's default thread
    count (all cores) oversubscribe the CPU many times over and the CPU-bound tests crawl."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_cores_between_xdist_workers()


@pytest.fixture
def triton_backend(monkeypatch):
    """Run fastdiff.ops through the Triton kernels (the interpreter on CPU tensors)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    return "triton"


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return "reference"


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
