"""Fused noise-prediction loss ||pred - eps||^2 and its gradient, eps regenerated in-kernel.

Forward reads pred once and writes one fp32 partial sum per program (summed per sample on the
host side of the launch, deterministically).  Backward regenerates eps from the same seed,
reads pred once and writes d loss / d pred = scale[n] * (pred - eps), where scale[n] carries
2 / (elements averaged over), the sample's weight and the incoming gradient.  So the loss and
its gradient cost 2 reads + 1 write per element, eps is generated once in each pass and never
touches memory.
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
    layout_args,
    program_sample,
    same_layout,
    seed_tensor,
)

#: Compile options of both kernels.  Without fusion: pred - eps would otherwise become one fma
#: on eps = R cos(theta) unrounded, so the loss would see an eps 0.5 ulp off the one the other
#: kernels (which multiply the rounded eps) regenerate from the same seed, and differ between
#: tile layouts (the FLAT4/NHWC4 selects fold away, GENERIC's do not).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _eps(noise_ptr, seed, base, offs, mask, C, HW, blocks_per_sample, s: tl.constexpr,
         ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
         FAST_MATH: tl.constexpr, NOISE_FROM_SEED: tl.constexpr):  # fmt: skip
    if NOISE_FROM_SEED:
        return chunk_noise(seed, base, offs, C, HW, blocks_per_sample, s,
                           ROWS, W, NCH, LAYOUT, FAST_MATH)  # fmt: skip
    return tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def noise_loss_fwd_kernel(
    pred_ptr, noise_ptr, partial_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr)
    total = 0.0
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        pred = tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _eps(noise_ptr, seed, base, offs, mask, C, HW, blocks_per_sample, s,
                   ROWS, W, NCH, LAYOUT, FAST_MATH, NOISE_FROM_SEED)  # fmt: skip
        diff = tl.where(mask, pred - eps, 0.0)
        total += tl.sum(diff * diff)
    tl.store(partial_ptr + tl.program_id(0), total)


@triton.jit
def noise_loss_bwd_kernel(
    pred_ptr, noise_ptr, grad_ptr, scale_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, _, _ = program_sample(n_per, blocks_per_sample)
    scale = tl.load(scale_ptr + n).to(tl.float32)
    seed = tl.load(seed_ptr)
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        pred = tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _eps(noise_ptr, seed, base, offs, mask, C, HW, blocks_per_sample, s,
                   ROWS, W, NCH, LAYOUT, FAST_MATH, NOISE_FROM_SEED)  # fmt: skip
        grad = scale * (pred - eps)
        tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _noise_args(pred: torch.Tensor, noise, seed) -> dict:
    return {
        "noise_ptr": same_layout(noise, pred) if noise is not None else pred,
        "seed_ptr": seed_tensor(0 if seed is None else seed, pred.device),
        "NOISE_FROM_SEED": noise is None,
    }


def noise_loss_sums_triton(pred: torch.Tensor, noise=None, seed=None) -> torch.Tensor:
    """Per-sample sums of (pred - eps)^2, fp32 of shape (B,), for pred (B, ...)."""
    pred = dense(pred)
    B = pred.shape[0]
    args = layout_args(pred, seeded=noise is None)
    blocks = args["blocks_per_sample"]
    partial = torch.empty(B * blocks, dtype=torch.float32, device=pred.device)
    launch(noise_loss_fwd_kernel, pred, args, seeded=noise is None, pred_ptr=pred,
           partial_ptr=partial, **_noise_args(pred, noise, seed), **COMPILE_OPTIONS)  # fmt: skip
    return partial.view(B, blocks).sum(dim=1)


def noise_loss_grad_triton(
    pred: torch.Tensor, scale: torch.Tensor, noise=None, seed=None
) -> torch.Tensor:
    """d loss / d pred = scale[n] * (pred - eps), same dtype and layout as pred.

    scale: fp32 (B,) on pred's device, e.g. 2 * weight[n] * grad_out / elements_averaged.
    """
    pred = dense(pred)
    grad = torch.empty_like(pred)
    launch(noise_loss_bwd_kernel, pred, seeded=noise is None, pred_ptr=pred, grad_ptr=grad,
           scale_ptr=scale.float(), **_noise_args(pred, noise, seed),
           **COMPILE_OPTIONS)  # fmt: skip
    return grad
