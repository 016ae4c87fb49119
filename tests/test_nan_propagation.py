"""A NaN in the model's prediction reaches the sample through every fused sampling step with
x0 clipping on, as it does through the torch reference (``torch.clamp`` keeps NaN): Triton's
default ``tl.minimum``/``tl.maximum`` would turn it into a finite +-1 (PTX ``min``/``max``,
the interpreter's ``np.fmin``/``np.fmax``), so a diverged model would give plausible-looking
samples on GPUs only.  Also: a strided DPM coefficient table is read as its values."""

import pytest
import torch
from helpers import DEVICE

from fastdiff import NoiseSchedule, ops
from fastdiff.samplers.dpm_solver import dpm_coefficients, dpm_timesteps

pytest.importorskip("triton")

S = NoiseSchedule.linear(1000)
COEFS = torch.from_numpy(dpm_coefficients(S._np["alphas_cumprod"], dpm_timesteps(1000, 10)))
SHAPE = (2, 3, 4, 4)
BAD = (1, 2, 3, 1)  # the element whose prediction is NaN


def _inputs(seed=0, nan_in=None):
    g = torch.Generator().manual_seed(seed)
    z, pred, prev = (3 * torch.randn(SHAPE, generator=g).to(DEVICE) for _ in range(3))
    if nan_in is not None:
        {"z": z, "pred": pred}[nan_in][BAD] = float("nan")
    return z, pred, prev


def _reverse(z, pred, prev):
    t = torch.tensor([600, 30], device=DEVICE)
    return ops.reverse_step(z, pred, t, S, noise=torch.zeros_like(z), clip_x0=True)


def _ddim(rule):
    def step(z, pred, prev):
        t, t_prev = torch.tensor([600, 30], device=DEVICE), torch.tensor([500, 10], device=DEVICE)
        return ops.ddim_step(z, pred, t, t_prev, S, seed=7, clip_x0=True, clip_rule=rule)

    return step


def _dpm(z, pred, prev):
    step = torch.tensor([5], device=DEVICE)
    return ops.dpm_solver_step(z, pred, step, prev, COEFS.float().to(DEVICE), clip_x0=True)


@pytest.mark.parametrize("nan_in", ["pred", "z"])
@pytest.mark.parametrize(
    "step", [_reverse, _ddim("rederive"), _ddim("diffusers"), _dpm],
    ids=["reverse_step", "ddim_rederive", "ddim_diffusers", "dpm_solver"],
)  # fmt: skip
def test_clipped_steps_propagate_nan_like_the_reference(monkeypatch, step, nan_in):
    """Where the clamp decides it: DPM-Solver (x0 = P z - Q eps, then only the clamped x0),
    DDIM's diffusers rule with a NaN z (eps is re-derived from the clamped x0).  Elsewhere
    the NaN also passes through an unclamped term, and the test only pins the agreement."""
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        z, pred, prev = _inputs(nan_in=nan_in)
        results[backend] = (step(z, pred, prev), prev)
    (want, want_x0), (got, got_x0) = results["reference"], results["triton"]
    assert torch.isnan(want[BAD]) and torch.isnan(want).sum() == 1
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isnan(got_x0), torch.isnan(want_x0))  # dpm: the stored x0


def test_dpm_step_reads_a_strided_coefficient_table_by_value(triton_backend):
    z, pred, prev = _inputs(seed=1)
    table = COEFS.float().to(DEVICE)
    strided = table.t().contiguous().t()  # the same (N, 5) values, column-major
    assert not strided.is_contiguous()
    step = torch.tensor([5], device=DEVICE)
    want = ops.dpm_solver_step(z, pred, step, prev.clone(), table)
    got = ops.dpm_solver_step(z, pred, step, prev.clone(), strided)
    assert torch.equal(got, want)
