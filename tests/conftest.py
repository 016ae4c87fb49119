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
