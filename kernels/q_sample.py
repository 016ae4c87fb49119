"""Fused noising: z_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps, eps drawn in-kernel or given.

One pass: reads x (and noise, if given), writes z_t.  With a seed, eps is generated from
(seed, logical element index) and never stored (see kernels.common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import chunk, chunk_noise, dense, launch, program_sample, same_layout, seed_tensor


@triton.jit
def q_sample_kernel(
    x_ptr, noise_ptr, out_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, _, _ = program_sample(n_per, blocks_per_sample)
    step = tl.load(t_ptr + n)
    a = tl.load(sqrt_ac_ptr + step).to(tl.float32)
    b = tl.load(sqrt_1m_ac_ptr + step).to(tl.float32)
    seed = tl.load(seed_ptr)
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if NOISE_FROM_SEED:
            eps = chunk_noise(seed, base, offs, C, HW, blocks_per_sample, s,
                              ROWS, W, NCH, LAYOUT, FAST_MATH)  # fmt: skip
        else:
            eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z = a * x + b * eps
        tl.store(out_ptr + base + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def q_sample_triton(
    x: torch.Tensor,
    t: torch.Tensor,
    sqrt_ac: torch.Tensor,
    sqrt_1m_ac: torch.Tensor,
    noise: torch.Tensor | None = None,
    seed=None,
) -> torch.Tensor:
    """z_t for x (B, ...) and t (B,) int; tables (T,) fp32.  Exactly one of noise / seed.

    Returns a tensor with x's dtype and memory layout.
    """
    x = dense(x)
    out = torch.empty_like(x)
    if noise is not None:
        noise = same_layout(noise, x)
    launch(
        q_sample_kernel,
        x,
        seeded=noise is None,
        x_ptr=x,
        noise_ptr=noise if noise is not None else x,
        out_ptr=out,
        t_ptr=t.contiguous(),  # the kernel reads t[n] at t_ptr + n
        sqrt_ac_ptr=sqrt_ac,
        sqrt_1m_ac_ptr=sqrt_1m_ac,
        seed_ptr=seed_tensor(0 if seed is None else seed, x.device),
        NOISE_FROM_SEED=noise is None,
    )
    return out
