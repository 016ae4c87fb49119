"""Fused reverse (sampling) step of Algorithm 20.2, noise injection included.

    mu      = coef_z[t] * z_t - coef_eps[t] * pred
            = (z_t - beta_t / sqrt(1 - alpha_t) * pred) / sqrt(1 - beta_t)
    z_{t-1} = mu + sigma[t] * eps,   eps = 0 where t == 0 (index 0 is the last step)

One pass reads z_t and pred and writes z_{t-1}.  t and the seed are read from device memory,
so a CUDA graph that captured this launch gives fresh, reproducible noise at every replay once
the caller updates those buffers (or increments them inside the graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dense, launch, same_layout, sample_block, seed_tensor, standard_normal


@triton.jit
def reverse_step_kernel(
    z_ptr, pred_ptr, noise_ptr, out_ptr, t_ptr, coef_z_ptr, coef_eps_ptr, sigma_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, r, mask, base = sample_block(BLOCK, n_per, blocks_per_sample)
    step = tl.load(t_ptr + n)
    cz = tl.load(coef_z_ptr + step).to(tl.float32)
    ce = tl.load(coef_eps_ptr + step).to(tl.float32)
    sigma = tl.where(step == 0, 0.0, tl.load(sigma_ptr + step).to(tl.float32))
    z = tl.load(z_ptr + base + r, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + base + r, mask=mask, other=0.0).to(tl.float32)
    if NOISE_FROM_SEED:
        eps = standard_normal(seed_ptr, base, r, C, HW, CHANNELS_LAST)
    else:
        eps = tl.load(noise_ptr + base + r, mask=mask, other=0.0).to(tl.float32)
    out = cz * z - ce * pred + sigma * eps
    tl.store(out_ptr + base + r, out.to(out_ptr.dtype.element_ty), mask=mask)


def reverse_step_triton(
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    coef_z: torch.Tensor,
    coef_eps: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
    seed=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{t-1} for z, pred (B, ...), t (B,) int, tables (T,) fp32; exactly one of noise / seed.

    Result has z's dtype and layout; ``out`` (same shape/dtype/layout as z) may be given to
    write in place, e.g. a static CUDA-graph buffer (``out`` may alias ``z``).
    """
    z = dense(z)
    if out is None:
        out = torch.empty_like(z)
    launch(
        reverse_step_kernel,
        z,
        z_ptr=z,
        pred_ptr=same_layout(pred, z),
        noise_ptr=same_layout(noise, z) if noise is not None else z,
        out_ptr=out,
        t_ptr=t,
        coef_z_ptr=coef_z,
        coef_eps_ptr=coef_eps,
        sigma_ptr=sigma,
        seed_ptr=seed_tensor(0 if seed is None else seed, z.device),
        NOISE_FROM_SEED=noise is None,
    )
    return out
