"""Fused DPM-Solver++ (2M) step (fastdiff.samplers.dpm_solver): one pass over the latents.

    eps = pred                 (GUIDED: pred_uncond + s (pred - pred_uncond), in registers)
    x0  = P z - Q eps          (CLIP_X0: clamped to [-1, 1])
    z'  = A z + (B + C) x0 - C x0_prev,     (P, Q, A, B, C) = coefs[k]

Reads z, pred (and pred_uncond) and the previous step's x0, writes z' and this step's x0 (in
place of x0_prev: the next step's history); nothing else is stored.  The step counter k is
read from device memory, so a CUDA graph that captured this launch takes the next row of the
table at every replay once the counter is advanced (the order-1 steps are rows with C = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import chunk, dense, launch, load_eps, program_sample, same_layout


@triton.jit
def dpm_solver_step_kernel(
    z_ptr, pred_ptr, uncond_ptr, x0_ptr, out_ptr, step_ptr, coef_ptr, scale,
    n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, CLIP_X0: tl.constexpr, GUIDED: tl.constexpr,
):  # fmt: skip
    program_sample(n_per, blocks_per_sample)
    row = coef_ptr + tl.load(step_ptr) * 5
    p = tl.load(row).to(tl.float32)
    q = tl.load(row + 1).to(tl.float32)
    a = tl.load(row + 2).to(tl.float32)
    b = tl.load(row + 3).to(tl.float32)
    c = tl.load(row + 4).to(tl.float32)
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = load_eps(pred_ptr, uncond_ptr, base, offs, mask, scale, GUIDED)
        x0 = p * z - q * eps
        if CLIP_X0:
            x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        prev = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        out = a * z + b * x0 + c * (x0 - prev)
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def dpm_solver_step_triton(
    z: torch.Tensor,
    pred: torch.Tensor,
    step: torch.Tensor,
    x0_prev: torch.Tensor,
    coefs: torch.Tensor,
    out: torch.Tensor,
    clip_x0: bool = False,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> None:
    """Write z' into ``out`` and this step's x0 into ``x0_prev``; z, pred, pred_uncond (B, ...)
    any layout (pred and pred_uncond are brought to z's), ``out`` and ``x0_prev`` dense in
    z's layout (``out`` may alias z); step a 1-element int64 tensor, coefs (N, 5) fp32."""
    z = dense(z)
    launch(
        dpm_solver_step_kernel,
        z,
        seeded=False,
        z_ptr=z,
        pred_ptr=same_layout(pred, z),
        uncond_ptr=same_layout(pred_uncond, z) if pred_uncond is not None else z,
        x0_ptr=x0_prev,
        out_ptr=out,
        step_ptr=step,
        coef_ptr=coefs,
        scale=float(guidance_scale),
        CLIP_X0=bool(clip_x0),
        GUIDED=pred_uncond is not None,
    )
