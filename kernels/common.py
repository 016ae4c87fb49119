"""What every fastdiff kernel shares: the in-kernel noise, the tile layouts and the launch grid.

Noise.  eps for the element with *logical* (NCHW, row-major) index L is output ``L % 4`` of
one Philox4x32-10 call: counter ``(g mod 2^32, g >> 32, 0, 0)`` with ``g = L // 4``, key =
the 64-bit seed (low word, high word), followed by two Box-Muller transforms:

    (w0, w1, w2, w3) = Philox4x32-10(seed, g)
    z0, z1 = box_muller(w0, w1),  z2, z3 = box_muller(w2, w3)
    box_muller(a, b):  U = a 2^-32 + 2^-33 in (0, 1],  V = b's top 23 bits as [-0.5, 0.5)
                       R = sqrt(max(-2 ln2 log2(U), 0)),  (R cos(2 pi V), R sin(2 pi V))

So four logical neighbours share one Philox call, and eps does not depend on memory layout.
``kernels.reference.philox_normal`` is the numpy twin.  What is promised:

* one backend, one device: the same seed gives bit-identical eps, in every layout, in every
  kernel (q_sample, noise_loss, reverse_step and ddim_step regenerate the same eps);
* the Triton interpreter (CPU) equals the numpy twin bit for bit (same float32 operations);
* compiled CUDA kernels use the hardware's approximate lg2/sin/cos/sqrt (``FAST_MATH``), so
  they differ from the twin by at most ``kernels.reference.noise_bound(R)`` per element,
  about 4e-6 * R + 7e-7 / R (derived there from the documented error bounds).  Precise
  functions would not make them equal (libdevice's logf/cosf are not numpy's) and cost
  instructions this memory-bound path does not have (docs/DESIGN_NOTES.md).

Tiles.  Program ``pid`` handles tile ``pid % blocks_per_sample`` of sample
``pid // blocks_per_sample`` (every sample is one dense run of memory in contiguous and in
channels_last tensors, so ``t[n]`` is a per-program scalar).  A tile is ``NCH`` chunks of shape
(ROWS, W), each row W memory-contiguous elements, laid out so that the four elements of a
Philox call sit in one thread and the call is made once (the compiled-code test counts it):

    LAYOUT   when                                  row                      Philox calls per row
    FLAT4    contiguous, n_per % 4 == 0            W = 16 bytes of elements W / 4 (consecutive L)
    NHWC4    channels_last, H*W % 4 == 0,          4 pixels x C channels    C (one per channel)
             2 <= C <= 8 (NCH = C chunks of 4)     (a quad of pixels)
    GENERIC  anything else (odd sizes, wide C),    W memory elements        one per element
             and every kernel given explicit noise

GENERIC computes L per element and keeps output ``L % 4`` of call ``L // 4``: the same numbers
at four times the generator work.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .reference import is_channels_last

GENERIC_NCHW, GENERIC_NHWC, FLAT4, NHWC4 = 0, 1, 2, 3
#: Elements each thread handles (amortises the per-thread key schedule and index math).
ELEMS_PER_THREAD = 16
MAX_WARPS = 4
NHWC4_MAX_CHANNELS = 8

_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_NEG_2_LN2 = tl.constexpr(-1.3862943611198906)  # R^2 = -2 ln U = -2 ln(2) log2(U)
_TWO_PI = tl.constexpr(6.283185307179586)


# -- noise -----------------------------------------------------------------------------------


@triton.jit
def philox4x32_10(seed, c0, c1):
    """Philox4x32-10 (Salmon et al. 2011) of counter (c0, c1, 0, 0), uint32 tensors; key = the
    int64 scalar seed (low, high word).  Returns the four uint32 output words."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, _PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(a0, _PHILOX_ROUND_A) ^ c3 ^ k1
        # Philox wraps around mod 2^32 by design: without sanitize_overflow=False, debug
        # builds (TRITON_DEBUG=1) assert "int32 overflow" here on every call (as in
        # triton.language.random).
        c1 = tl.mul(a2, _PHILOX_ROUND_B, sanitize_overflow=False)
        c3 = tl.mul(a0, _PHILOX_ROUND_A, sanitize_overflow=False)
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def box_muller(a, b, FAST_MATH: tl.constexpr):
    """Two N(0, 1) values from two uint32 words (see the module docstring for the formula)."""
    u = a.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # exact
    v = ((b >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.5  # exact, [-0.5, 0.5)
    theta = _TWO_PI * v
    if FAST_MATH:  # lg2/sin/cos.approx.ftz.f32 and sqrt.approx: see kernels.reference.noise_bound
        r = tl.sqrt(tl.maximum(libdevice.fast_log2f(u) * _NEG_2_LN2, 0.0))
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:  # the Triton interpreter: numpy float32, as kernels.reference does
        r = tl.sqrt(tl.maximum(tl.log2(u) * _NEG_2_LN2, 0.0))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def normal4(seed, g, FAST_MATH: tl.constexpr):
    """The four normals of Philox call g (int64 tensor): elements 4g .. 4g+3."""
    w0, w1, w2, w3 = philox4x32_10(seed, g.to(tl.uint32), (g >> 32).to(tl.uint32))
    z0, z1 = box_muller(w0, w1, FAST_MATH)
    z2, z3 = box_muller(w2, w3, FAST_MATH)
    return z0, z1, z2, z3


@triton.jit
def _pick(z0, z1, z2, z3, k: tl.constexpr):
    if k == 0:
        return z0
    elif k == 1:
        return z1
    elif k == 2:
        return z2
    else:
        return z3


# -- tiles -----------------------------------------------------------------------------------


@triton.jit
def program_sample(n_per, blocks_per_sample):
    """(sample n, its int64 memory base, the tile index b within the sample) of this program."""
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    return n, n.to(tl.int64) * n_per, pid % blocks_per_sample


@triton.jit
def chunk(
    n_per, blocks_per_sample, s: tl.constexpr,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    """Chunk s of this program's tile: (int64 base of the sample, within-sample memory offsets
    (ROWS, W), mask).  NHWC4 rows are quads of pixels (4 * NCH elements) cut into NCH chunks of
    4; every other layout has one chunk of ROWS rows of W consecutive elements."""
    _, base, b = program_sample(n_per, blocks_per_sample)
    row = b * ROWS + tl.arange(0, ROWS)[:, None]
    i = tl.arange(0, W)[None, :]
    if LAYOUT == 3:
        offs = row * (4 * NCH) + 4 * s + i
    else:
        offs = row * W + i
    return base, offs, offs < n_per


@triton.jit
def load_eps(pred_ptr, uncond_ptr, base, offs, mask, scale, GUIDED: tl.constexpr):
    """A chunk's eps, fp32: pred, or with GUIDED classifier-free guidance's
    u + scale (pred - u), u = pred_uncond (formed in registers, never stored)."""
    eps = tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        u = tl.load(uncond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = u + scale * (eps - u)
    return eps


@triton.jit
def chunk_noise(seed, base, offs, C, HW, blocks_per_sample, s: tl.constexpr,
                ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
                FAST_MATH: tl.constexpr):  # fmt: skip
    """eps for chunk s (see ``chunk``), fp32 (ROWS, W); seed is the loaded int64 scalar.

    FLAT4/NHWC4 make each Philox call once per row and place its four outputs with selects on
    the column index, which the compiler resolves per register (the column dimension lies in
    one thread); the calls of an NHWC4 row are shared by its NCH chunks (common
    subexpressions, as long as the seed is loaded once, before any store).
    """
    i = tl.arange(0, W)[None, :]
    if LAYOUT == 2:
        b = tl.program_id(0) % blocks_per_sample
        row = (b * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        eps = tl.zeros((ROWS, W), tl.float32)
        for h in tl.static_range(W // 4):
            z0, z1, z2, z3 = normal4(seed, base // 4 + row * (W // 4) + h, FAST_MATH)
            for k in tl.static_range(4):
                eps = tl.where(i == 4 * h + k, _pick(z0, z1, z2, z3, k)[:, None], eps)
        return eps
    elif LAYOUT == 3:
        b = tl.program_id(0) % blocks_per_sample
        quad = b * ROWS + tl.arange(0, ROWS)
        eps = tl.zeros((ROWS, W), tl.float32)
        for c in tl.static_range(NCH):
            z0, z1, z2, z3 = normal4(seed, (base + c * HW) // 4 + quad, FAST_MATH)
            for k in tl.static_range(4):
                # pixel k, channel c of the quad sits at row position k * NCH + c
                if (k * NCH + c) // 4 == s:
                    eps = tl.where(i == (k * NCH + c) % 4, _pick(z0, z1, z2, z3, k)[:, None], eps)
        return eps
    else:
        if LAYOUT == 1:  # memory (h, w, c) -> logical (c, h, w)
            L = base + (offs % C).to(tl.int64) * HW + offs // C
        else:
            L = base + offs
        z0, z1, z2, z3 = normal4(seed, L // 4, FAST_MATH)
        lane = L % 4
        return tl.where(lane < 2, tl.where(lane == 0, z0, z1), tl.where(lane == 2, z2, z3))


# -- host side -------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def tile_layout(x: torch.Tensor, seeded: bool) -> int:
    """The LAYOUT a kernel over the dense tensor x uses (see the module docstring)."""
    n_per = x[0].numel() if x.shape[0] else 0
    if is_channels_last(x):
        C, HW = x.shape[1], x.shape[2] * x.shape[3]
        if not seeded:
            return GENERIC_NCHW  # memory order; no logical index needed
        if HW % 4 == 0 and 2 <= C <= NHWC4_MAX_CHANNELS:
            return NHWC4
        return GENERIC_NHWC
    return FLAT4 if seeded and n_per % 4 == 0 else GENERIC_NCHW


def layout_args(x: torch.Tensor, seeded: bool = True) -> dict:
    """Scalar and constexpr kernel arguments for a dense x of shape (B, ...), and the grid."""
    B = x.shape[0]
    n_per = x.numel() // B if B else 0
    layout = tile_layout(x, seeded)
    cl = is_channels_last(x)
    C = x.shape[1] if cl else 1
    HW = n_per // C if cl else n_per
    # GENERIC with noise makes one Philox call per element: 4 elements per thread keep it
    # within 128 registers.  Everything else moves 16-byte vectors, 16 elements per thread.
    per_element_noise = seeded and layout in (GENERIC_NCHW, GENERIC_NHWC)
    if layout == NHWC4:
        W, nch = 4, C
    else:
        W, nch = (4 if per_element_noise else max(4, 16 // x.element_size())), 1
    per_thread = 4 if per_element_noise else ELEMS_PER_THREAD
    rows_needed = max(1, triton.cdiv(n_per, W * nch))
    rows_per_thread = max(1, per_thread // (W * nch))
    # At least one warp's worth of rows: a smaller tile only masks lanes of that warp, and
    # every distinct ROWS is another compile (small tensors would each get their own).
    rows = min(
        rows_per_thread * 32 * MAX_WARPS,
        max(rows_per_thread * 32, triton.next_power_of_2(rows_needed)),
    )
    warps = max(1, min(MAX_WARPS, rows // (32 * rows_per_thread)))
    blocks = triton.cdiv(rows_needed, rows) if n_per else 0
    if n_per + rows * W * nch > 2**31 - 1:  # offsets within a sample are int32 in the kernels
        raise ValueError(
            f"x: {n_per} elements per sample (shape {tuple(x.shape)}) is more than the fused"
            f" kernels' 32-bit offsets within a sample allow ({2**31 - 1 - rows * W * nch})"
        )
    return {
        "n_per": n_per,
        "C": C,
        "HW": HW,
        "blocks_per_sample": max(blocks, 1),
        "ROWS": rows,
        "W": W,
        "NCH": nch,
        "LAYOUT": layout,
        "FAST_MATH": not interpreting(),
        "num_warps": warps,
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


def device_guard(device: torch.device):
    """The context every launch runs in: ``device`` made the current CUDA device.

    Triton launches on the *current* device and its current stream, whatever device the
    pointers belong to; without this, ops on ``cuda:1`` tensors would run on GPU 0's stream
    with GPU 1's addresses.  A no-op for other devices (the interpreter runs on the CPU).
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, x: torch.Tensor, args: dict | None = None, *, seeded: bool, **kwargs) -> None:
    """Launch ``kernel`` over the tiles of x on x's device (see the module docstring);
    ``args`` is ``layout_args(x, seeded)`` when the caller already has it."""
    args = dict(args or layout_args(x, seeded))
    grid = args.pop("grid")
    if grid[0] == 0:
        return
    with device_guard(x.device):
        kernel[grid](**kwargs, **args)
