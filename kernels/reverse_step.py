"""Fused reverse (sampling) step of Algorithm 20.2, noise injection included.

    mu      = coef_z[t] * z_t - coef_eps[t] * pred
            = (z_t - beta_t / sqrt(1 - alpha_t) * pred) / sqrt(1 - beta_t)
    z_{t-1} = mu + sigma[t] * eps,   eps = 0 where t == 0 (index 0 is the last step)

With CLIP_X0 (improved-diffusion's ``clip_denoised``), mu is the posterior mean at the
predicted x0 clamped to [-1, 1]:

    x0 = sqrt_recip_ac[t] * z_t - sqrt_recipm1_ac[t] * pred   (= (z_t - sqrt(1 - alpha_t) pred)
                                                                  / sqrt(alpha_t), no division)
    mu = mu + coef_x0[t] * (clamp(x0, -1, 1) - x0)      (= c0 clamp(x0) + c1 z_t)

With GUIDED (classifier-free guidance, Ho & Salimans 2022; diffusers' convention), pred is
the conditional prediction and a second input the unconditional one; the eps used above is

    pred = pred_uncond + s * (pred - pred_uncond)         (s = 1: pred; s = 0: pred_uncond)

formed in registers, never stored.

One pass reads z_t and pred (and pred_uncond) and writes z_{t-1}.  t and the seed are read
from device memory, so a CUDA graph that captured this launch gives fresh, reproducible noise
at every replay once the caller updates those buffers (or increments them inside the graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    chunk,
    chunk_noise,
    dense,
    launch,
    load_eps,
    program_sample,
    same_layout,
    seed_tensor,
)


@triton.jit
def reverse_step_kernel(
    z_ptr, pred_ptr, noise_ptr, out_ptr, t_ptr, coef_z_ptr, coef_eps_ptr, sigma_ptr, seed_ptr,
    sqrt_recip_ac_ptr, sqrt_recipm1_ac_ptr, coef_x0_ptr, uncond_ptr, guidance,
    n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, NOISE_FROM_SEED: tl.constexpr, CLIP_X0: tl.constexpr,
    GUIDED: tl.constexpr,
):  # fmt: skip
    n, _, _ = program_sample(n_per, blocks_per_sample)
    step = tl.load(t_ptr + n)
    cz = tl.load(coef_z_ptr + step).to(tl.float32)
    ce = tl.load(coef_eps_ptr + step).to(tl.float32)
    sigma = tl.where(step == 0, 0.0, tl.load(sigma_ptr + step).to(tl.float32))
    if CLIP_X0:
        rz = tl.load(sqrt_recip_ac_ptr + step).to(tl.float32)
        re = tl.load(sqrt_recipm1_ac_ptr + step).to(tl.float32)
        c0 = tl.load(coef_x0_ptr + step).to(tl.float32)
    seed = tl.load(seed_ptr)  # once, before any store: the NHWC4 chunks share its Philox calls
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pred = load_eps(pred_ptr, uncond_ptr, base, offs, mask, guidance, GUIDED)
        if NOISE_FROM_SEED:
            eps = chunk_noise(seed, base, offs, C, HW, blocks_per_sample, s,
                              ROWS, W, NCH, LAYOUT, FAST_MATH)  # fmt: skip
        else:
            eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        mu = cz * z - ce * pred
        if CLIP_X0:
            x0 = rz * z - re * pred
            mu = mu + c0 * (tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL) - x0)
        out = mu + sigma * eps
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    clip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """z_{t-1} for z, pred (B, ...), t (B,) int, tables (T,) fp32; exactly one of noise / seed.

    Result has z's dtype and layout; ``out`` (same shape/dtype/layout as z) may be given to
    write in place, e.g. a static CUDA-graph buffer (``out`` may alias ``z``).  ``clip`` =
    (sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef_x0) tables,
    fp32 (T,), turns on x0 clipping.  ``pred_uncond`` (like pred) turns on guidance: the
    step uses pred_uncond + guidance_scale * (pred - pred_uncond) as its eps.
    """
    z = dense(z)
    if out is not None and (out.shape != z.shape or out.stride() != z.stride()):
        # the kernel writes z's dense layout; any other ``out`` gets the result copied in
        result = reverse_step_triton(
            z, pred, t, coef_z, coef_eps, sigma, noise, seed, clip=clip,
            pred_uncond=pred_uncond, guidance_scale=guidance_scale,
        )  # fmt: skip
        return out.copy_(result)
    if out is None:
        out = torch.empty_like(z)
    launch(
        reverse_step_kernel,
        z,
        seeded=noise is None,
        z_ptr=z,
        pred_ptr=same_layout(pred, z),
        noise_ptr=same_layout(noise, z) if noise is not None else z,
        out_ptr=out,
        t_ptr=t.contiguous(),  # the kernel reads t[n] at t_ptr + n
        coef_z_ptr=coef_z,
        coef_eps_ptr=coef_eps,
        sigma_ptr=sigma,
        seed_ptr=seed_tensor(0 if seed is None else seed, z.device),
        sqrt_recip_ac_ptr=clip[0] if clip is not None else coef_z,  # unread without CLIP_X0
        sqrt_recipm1_ac_ptr=clip[1] if clip is not None else coef_z,
        coef_x0_ptr=clip[2] if clip is not None else coef_z,
        uncond_ptr=same_layout(pred_uncond, z) if pred_uncond is not None else z,  # unread
        guidance=float(guidance_scale),
        NOISE_FROM_SEED=noise is None,
        CLIP_X0=clip is not None,
        GUIDED=pred_uncond is not None,
    )
    return out
