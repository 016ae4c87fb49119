"""Shared test set-up.  TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
