"""Fused noise-prediction loss ||pred - eps||^2 and its gradient, eps regenerated in-kernel.

Forward reads pred once and writes one fp32 partial sum per program (summed per sample on the
host side of the launch, deterministically).  Backward regenerates eps from the same seed,
reads pred once and writes d loss / d pred = scale[n] * (pred - eps), where scale[n] carries
2 / (elements averaged over), the sample's weight and the incoming gradient.  So the loss and
its gradient cost 2 reads + 1 write per element and eps never touches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    dense,
    launch,
    layout_args,
    same_layout,
    sample_block,
    seed_tensor,
    standard_normal,
)


@triton.jit
def _eps(noise_ptr, seed_ptr, base, r, mask, C, HW,
         CHANNELS_LAST: tl.constexpr, NOISE_FROM_SEED: tl.constexpr):  # fmt: skip
    if NOISE_FROM_SEED:
        return standard_normal(seed_ptr, base, r, C, HW, CHANNELS_LAST)
    return tl.load(noise_ptr + base + r, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def noise_loss_fwd_kernel(
    pred_ptr, noise_ptr, partial_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, r, mask, base = sample_block(BLOCK, n_per, blocks_per_sample)
    pred = tl.load(pred_ptr + base + r, mask=mask, other=0.0).to(tl.float32)
    eps = _eps(noise_ptr, seed_ptr, base, r, mask, C, HW, CHANNELS_LAST, NOISE_FROM_SEED)
    diff = tl.where(mask, pred - eps, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(diff * diff, axis=0))


@triton.jit
def noise_loss_bwd_kernel(
    pred_ptr, noise_ptr, grad_ptr, scale_ptr, seed_ptr,
    n_per, C, HW, blocks_per_sample,
    BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, r, mask, base = sample_block(BLOCK, n_per, blocks_per_sample)
    scale = tl.load(scale_ptr + n).to(tl.float32)
    pred = tl.load(pred_ptr + base + r, mask=mask, other=0.0).to(tl.float32)
    eps = _eps(noise_ptr, seed_ptr, base, r, mask, C, HW, CHANNELS_LAST, NOISE_FROM_SEED)
    grad = scale * (pred - eps)
    tl.store(grad_ptr + base + r, grad.to(grad_ptr.dtype.element_ty), mask=mask)


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
    args = layout_args(pred)
    blocks = args["blocks_per_sample"]
    partial = torch.empty(B * blocks, dtype=torch.float32, device=pred.device)
    launch(noise_loss_fwd_kernel, pred, args, pred_ptr=pred, partial_ptr=partial,
           **_noise_args(pred, noise, seed))  # fmt: skip
    return partial.view(B, blocks).sum(dim=1)


def noise_loss_grad_triton(
    pred: torch.Tensor, scale: torch.Tensor, noise=None, seed=None
) -> torch.Tensor:
    """d loss / d pred = scale[n] * (pred - eps), same dtype and layout as pred.

    scale: fp32 (B,) on pred's device, e.g. 2 * weight[n] * grad_out / elements_averaged.
    """
    pred = dense(pred)
    grad = torch.empty_like(pred)
    launch(noise_loss_bwd_kernel, pred, pred_ptr=pred, grad_ptr=grad,
           scale_ptr=scale.float(), **_noise_args(pred, noise, seed))  # fmt: skip
    return grad
