"""Every Triton launch runs with its tensors' CUDA device made current.

Triton launches on the current device and its current stream; an op on ``cuda:1`` tensors
launched while ``cuda:0`` is current would run GPU 0's stream over GPU 1's pointers.  Without
a GPU this is checked with test doubles: ``torch.cuda.device`` records the device it makes
current, and each kernel records which device was current when it was launched.
"""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from fastdiff.kernels import (  # noqa: E402
    common,
    ddim,
    dpm_solver,
    group_norm,
    noise_loss,
    q_sample,
    reverse_step,
)


class Recorder:
    """Stand-ins for torch.cuda.device and for the kernels' ``kernel[grid](...)``."""

    def __init__(self):
        self.current = None  # the device torch.cuda.device made current
        self.launches = []  # (kernel name, current device at launch)

    @contextlib.contextmanager
    def cuda_device(self, device):
        saved, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = saved

    def kernel(self, name):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((name, recorder.current))

        return Kernel()


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec.cuda_device)
    # CPU tensors stand in for cuda:1 ones: the guard is asked for the device they are on.
    real_guard = common.device_guard
    cuda1 = torch.device("cuda", 1)

    def guard(device):
        assert device == torch.device("cpu")  # the launcher passes its tensors' device
        return real_guard(cuda1)

    for module in (common, group_norm):
        monkeypatch.setattr(module, "device_guard", guard)
    for module, names in [
        (q_sample, ["q_sample_kernel"]),
        (reverse_step, ["reverse_step_kernel"]),
        (ddim, ["ddim_step_kernel"]),
        (dpm_solver, ["dpm_solver_step_kernel"]),
        (noise_loss, ["noise_loss_fwd_kernel", "noise_loss_bwd_kernel"]),
        (group_norm, [n for n in dir(group_norm) if n.startswith("group_norm_") and
                      n.endswith("_kernel")]),
    ]:  # fmt: skip
        for name in names:
            monkeypatch.setattr(module, name, rec.kernel(name))
    return rec


def test_the_guard_makes_a_cuda_device_current_and_leaves_others_alone(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec.cuda_device)
    with common.device_guard(torch.device("cuda", 1)):
        assert rec.current == torch.device("cuda", 1)
    assert rec.current is None
    with common.device_guard(torch.device("cpu")):
        assert rec.current is None


def test_every_launcher_launches_under_its_tensors_device(recorder):
    x = torch.randn(2, 4, 4, 4)
    t = torch.tensor([0, 3])
    table = torch.linspace(0.1, 0.9, 5)
    q_sample.q_sample_triton(x, t, table, table, seed=1)
    reverse_step.reverse_step_triton(x, x, t, table, table, table, seed=1)
    noise_loss.noise_loss_sums_triton(x, seed=1)
    noise_loss.noise_loss_grad_triton(x, torch.ones(2), seed=1)
    ddim.ddim_step_triton(x, x, t, t - 1, table, 1.0, seed=1)
    dpm_solver.dpm_solver_step_triton(x, x, t[:1], x.clone(), torch.ones(1, 5), x.clone())
    xc = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(4), torch.zeros(4)
    out, mean, rstd = group_norm.group_norm_fwd_triton(xc, w, b, 2, 1e-5, True)
    group_norm.group_norm_bwd_triton(torch.ones_like(xc), xc, w, b, mean, rstd, 2, True)
    names = [name for name, _ in recorder.launches]
    assert {"q_sample_kernel", "reverse_step_kernel", "noise_loss_fwd_kernel",
            "noise_loss_bwd_kernel", "ddim_step_kernel",
            "dpm_solver_step_kernel"} <= set(names)  # fmt: skip
    assert sum(n.startswith("group_norm_") for n in names) == 6  # 3 forward, 3 backward
    assert all(device == torch.device("cuda", 1) for _, device in recorder.launches)
    assert recorder.current is None
