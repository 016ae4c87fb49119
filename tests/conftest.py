"""Shared test set-up.

Without a GPU, the Triton kernels run under the interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 before anything imports triton.  With a GPU, the kernel tests run the
compiled kernels on CUDA tensors instead (helpers.DEVICE).
"""

import os

import pytest
import torch
from helpers import require_interpreter, write_npz

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
def cpu_triton(monkeypatch):
    """The Triton kernels on CPU tensors: the interpreter (skipped in a CUDA run, where it is
    off; tests on helpers.DEVICE use ``triton_backend`` and run compiled kernels there)."""
    pytest.importorskip("triton")
    require_interpreter()
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    return "triton"


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return "reference"


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _not_strict_unless_asked(monkeypatch):
    """Tests of the graph fallbacks rely on the default (not strict); benchmarks/gpu_check.py
    runs every part with FASTDIFF_STRICT=1, so each test starts without it and sets it (or
    passes strict=True) where that is what it checks."""
    monkeypatch.delenv("FASTDIFF_STRICT", raising=False)


class EmulatedCuda:
    """The CPU emulation of CUDA graphs (tests/cuda_graph_emulation.py) with fastdiff's
    captured steps pointed at it: ``cuda_graphs.on_cuda`` says yes for the CPU, and the fused
    ops take the Triton path (the interpreter), as on a GPU (the reference reads seeds on the
    host, which a capture refuses)."""

    def __init__(self, monkeypatch):
        import cuda_graph_emulation

        from fastdiff import cuda_graphs

        self.emulator = cuda_graph_emulation.install(monkeypatch)
        self._monkeypatch = monkeypatch
        monkeypatch.setattr(cuda_graphs, "on_cuda", lambda device: True)
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")

    @property
    def captures(self) -> int:
        """Captures that succeeded."""
        return self.emulator.captures_succeeded

    @property
    def train_captures(self) -> int:
        """Captures that succeeded of graphs with a registered generator: the training step's
        (the sampler's step registers none)."""
        return sum(
            c.status == "succeeded" and self.emulator.graphs[c.graph].generators > 0
            for c in self.emulator.captures
        )

    @property
    def capture_log(self):
        """Every capture started (``cuda_graph_emulation.CaptureRecord``)."""
        return self.emulator.captures

    @property
    def replays(self) -> int:
        return self.emulator.replays

    def disable(self) -> None:
        """From now on the same step functions run eagerly (GraphStep without capture; the
        sampler's eager loop), as they do on a CPU: the run to compare a captured one with.
        ``on_cuda`` is false again, so the CUDA defaults go too: a comparison that leaves
        ``channels_last`` on auto with bf16 (auto on AVX-512 BF16 hosts) would compare
        channels_last and the bf16 sampling copy with NCHW fp32 weights: pin both."""
        from fastdiff import cuda_graphs, train_graph

        self._monkeypatch.setattr(cuda_graphs, "on_cuda", lambda device: False)
        self._monkeypatch.setattr(
            train_graph, "graph_enabled", lambda requested, device, dist, strict=False: requested
        )


@pytest.fixture
def emulated_cuda(monkeypatch):
    pytest.importorskip("triton")
    require_interpreter()  # the emulated steps run the kernels on CPU tensors
    cuda = EmulatedCuda(monkeypatch)
    yield cuda
    cuda.emulator.close()


@pytest.fixture
def npz(tmp_path):
    """``write_npz`` with 8 images in the test's tmp_path."""
    return write_npz(tmp_path / "data.npz")
