"""fastdiff's fused ops against the same math written the usual way in eager PyTorch.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=FILE`` for extra_info).
Each group holds both sides of one comparison, timed in the same run:

* ``fastdiff_<backend>``: fastdiff.ops with a seed (noise drawn inside the op).  On CUDA that is
  the fused Triton kernel; on CPU it is the torch reference path (Philox noise computed in
  int64 torch arithmetic, several passes): what a fastdiff user on CPU gets, not a fused kernel.
* ``eager``: ``torch.randn_like`` plus plain tensor arithmetic (and ``F.mse_loss``).

extra_info: shape, dtype, layout, device, backend, bytes_moved and, after timing, gb_per_s =
bytes_moved / median.  For the fastdiff side bytes_moved is the minimum a fused op must move
(N = numel, s = itemsize; the (B,)-sized t and table gathers are ignored):

    q_sample          read x, write z                                    2 N s
    loss fwd+bwd      q_sample + read pred (fwd), read pred + write grad  2 N s + 3 N s
    reverse_step      read z, read pred, write out                        3 N s

For the eager side it is our estimate of what eager PyTorch moves: one read per input and one
write per output of every elementwise kernel, intermediates included (each op is its own
kernel in eager mode; see the EAGER_* constants).  On the CPU reference path the minimum
understates the traffic, so its gb_per_s is an effective figure.

Ops run with validate=False, as the training and sampling loops call them (the eager side
checks nothing either).  The per-sample coefficients are gathered from fp32 tables and cast
to the image dtype before touching the images, as a careful user would (diffusers does).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops

SEED = 1234

# Eager bytes, in units of N * itemsize (elementwise kernels; (B,)-sized ops ignored):
#   q_sample: randn_like writes eps (1); a*x reads x, writes tmp (2); b*eps reads eps, writes
#   tmp (2); tmp + tmp reads 2, writes z (3).
EAGER_Q_SAMPLE = 1 + 2 + 2 + 3  # 8
#   loss: the q_sample above (8); F.mse_loss forward writes the unreduced (pred - eps)^2 from
#   pred and eps (3) and mean() reads it back (1); mse_loss_backward reads pred and eps and
#   writes grad (3) (AccumulateGrad steals that buffer since pred.grad is reset to None).
EAGER_LOSS = EAGER_Q_SAMPLE + 3 + 1 + 3  # 15
#   reverse step: c*pred (2); z - tmp (3); tmp / c2 (2); randn_like (1); sigma*eps (2);
#   mu + tmp (3).
EAGER_REVERSE = 2 + 3 + 2 + 1 + 2 + 3  # 13

FUSED_Q_SAMPLE = 2
FUSED_LOSS = FUSED_Q_SAMPLE + 3
FUSED_REVERSE = 3


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac):
    eps = torch.randn_like(x)
    return _per_sample(sqrt_ac[t], x) * x + _per_sample(sqrt_1m_ac[t], x) * eps, eps


def eager_reverse_step(z, pred, t, betas, alphas_cumprod, sigma):
    b, ac = betas[t], alphas_cumprod[t]
    coef_eps = _per_sample(b / torch.sqrt(1 - ac), z)
    coef_div = _per_sample(torch.sqrt(1 - b), z)
    sig = _per_sample(sigma[t] * (t > 0), z)  # no noise at the last step (index 0)
    return (z - coef_eps * pred) / coef_div + sig * torch.randn_like(z)


def _side(case, impl) -> str:
    return f"fastdiff_{case.backend}" if impl == "fastdiff" else "eager"


def _check_backend(case, x) -> str:
    """The backend fastdiff will use for x; skip if it is not the one the test id names."""
    try:
        actual = ops.backend_for(x)
    except (RuntimeError, ValueError) as exc:  # e.g. FASTDIFF_BACKEND=triton on CPU tensors
        pytest.skip(f"default dispatch overridden: {exc}")
    if actual != case.backend:
        pytest.skip(f"FASTDIFF_BACKEND sends this case to {actual}, the id says {case.backend}")
    return actual


def _t(case, schedule) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, schedule.T, (case.shape[0],), generator=g).to(case.device)


def _info(case, impl, backend) -> dict:
    return {**case.info(), "backend": backend if impl == "fastdiff" else "eager"}


def test_q_sample(benchmark, measure, case, impl, schedule):
    x = case.tensor()
    t = _t(case, schedule)
    backend = _check_backend(case, x)
    if impl == "fastdiff":

        def fn():
            return ops.q_sample(x, t, schedule, seed=SEED, validate=False)

        units = FUSED_Q_SAMPLE
    else:
        sqrt_ac = schedule.table("sqrt_alphas_cumprod")
        sqrt_1m_ac = schedule.table("sqrt_one_minus_alphas_cumprod")

        def fn():
            return eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac)[0]

        units = EAGER_Q_SAMPLE
    z = measure(
        fn,
        group=case.group("q_sample"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert z.shape == x.shape and z.dtype == x.dtype


def test_loss_fwd_bwd(benchmark, measure, case, impl, schedule):
    """One training step's noising and loss, forward and backward (pred stands for the model)."""
    x = case.tensor()
    pred = case.tensor(requires_grad=True)
    t = _t(case, schedule)
    backend = _check_backend(case, x)
    if impl == "fastdiff":

        def fn():
            pred.grad = None
            z = ops.q_sample(x, t, schedule, seed=SEED, validate=False)
            loss = ops.noise_loss(pred, t, seed=SEED, validate=False)
            loss.backward()
            return z, loss

        units = FUSED_LOSS
    else:
        sqrt_ac = schedule.table("sqrt_alphas_cumprod")
        sqrt_1m_ac = schedule.table("sqrt_one_minus_alphas_cumprod")

        def fn():
            pred.grad = None
            z, eps = eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac)
            loss = F.mse_loss(pred, eps)
            loss.backward()
            return z, loss

        units = EAGER_LOSS
    z, loss = measure(
        fn,
        group=case.group("loss_fwd_bwd"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert z.shape == x.shape and loss.dim() == 0
    assert pred.grad is not None and pred.grad.shape == pred.shape


def test_reverse_step(benchmark, measure, case, impl, schedule):
    z = case.tensor()
    pred = case.tensor()
    t = _t(case, schedule)
    backend = _check_backend(case, z)
    if impl == "fastdiff":

        def fn():
            return ops.reverse_step(z, pred, t, schedule, seed=SEED, validate=False)

        units = FUSED_REVERSE
    else:
        betas = schedule.table("betas")
        alphas_cumprod = schedule.table("alphas_cumprod")
        sigma = schedule.table("sigma_beta")

        def fn():
            return eager_reverse_step(z, pred, t, betas, alphas_cumprod, sigma)

        units = EAGER_REVERSE
    out = measure(
        fn,
        group=case.group("reverse_step"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert out.shape == z.shape and out.dtype == z.dtype


def test_copy_baseline(benchmark, measure, cuda_case):
    """The device's copy bandwidth at q_sample's traffic (read x, write a copy: 2 N s).

    Sits in the q_sample group, so the fused kernels' GB/s can be read against it.
    """
    x = cuda_case.tensor()
    out = torch.empty_like(x)
    measure(
        lambda: out.copy_(x),
        group=cuda_case.group("q_sample"),
        side="copy",
        bytes_moved=2 * cuda_case.numel * cuda_case.itemsize,
        backend="torch copy_",
        **cuda_case.info(),
    )
