"""What every fastdiff kernel shares: the in-kernel noise, the layout rule and the launch grid.

Launch grid.  Every kernel works on a batch of B samples, each a dense block of ``n_per``
elements in memory (true for contiguous and for channels_last tensors: the batch dimension is
outermost in both).  Program ``pid`` handles block ``pid % blocks_per_sample`` of sample
``pid // blocks_per_sample``, so the per-sample step ``t[n]`` and its coefficients are loaded
once per program as scalars.

Noise.  eps for the element with *logical* (NCHW, row-major) index L is
``tl.randn(seed, L)``: Philox-4x32-10 keyed by the 64-bit seed, counter L, Box-Muller.  It does
not depend on memory layout, and ``kernels.reference.philox_normal`` reproduces it in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import is_channels_last

MAX_BLOCK = 2048
MIN_BLOCK = 128


@triton.jit
def sample_block(BLOCK: tl.constexpr, n_per, blocks_per_sample):
    """(sample n, element offsets r within the sample, mask, int64 memory base of the sample)."""
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    r = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    base = n.to(tl.int64) * n_per
    return n, r, r < n_per, base


@triton.jit
def standard_normal(seed_ptr, base, r, C, HW, CHANNELS_LAST: tl.constexpr):
    """N(0, 1) noise for the elements at within-sample memory offsets r of the sample at base.

    The Philox counter is the logical NCHW index, so a channels_last tensor (memory order
    n, h, w, c) gets the same eps per element (n, c, h, w) as a contiguous one.
    """
    if CHANNELS_LAST:
        r = (r % C) * HW + r // C
    seed = tl.load(seed_ptr)
    return tl.randn(seed, base + r)


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def same_layout(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """y laid out in memory like ``like`` (a no-op when it already is)."""
    if is_channels_last(like):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def layout_args(x: torch.Tensor) -> dict:
    """Scalar kernel arguments describing a dense x of shape (B, ...)."""
    B = x.shape[0]
    n_per = x.numel() // B if B else 0
    block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(max(n_per, 1))))
    blocks = triton.cdiv(n_per, block)
    cl = is_channels_last(x)
    C = x.shape[1] if cl else 1
    HW = n_per // C if cl else 1
    return {
        "n_per": n_per,
        "C": C,
        "HW": HW,
        "blocks_per_sample": blocks,
        "BLOCK": block,
        "CHANNELS_LAST": cl,
        "num_warps": 4 if block <= 1024 else 8,
        "grid": (B * blocks,),
    }


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a 1-element int64 tensor on ``device`` (kernels read it from memory).

    A Python int becomes a device tensor filled in place (no host-device copy); a tensor is
    used as is, so a CUDA graph that captured the kernel reads whatever the buffer holds.
    """
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def launch(kernel, x: torch.Tensor, args: dict | None = None, **kwargs) -> None:
    """Launch ``kernel`` over the sample blocks of x (see module docstring); ``args`` is
    ``layout_args(x)`` when the caller already has it."""
    args = dict(args or layout_args(x))
    grid = args.pop("grid")
    if grid[0] == 0:
        return
    kernel[grid](**kwargs, **args)
