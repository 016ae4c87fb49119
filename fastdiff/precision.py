"""Device and numeric-precision choices for training and sampling.

Precisions: "fp32"; "bf16" (autocast to bfloat16); "fp16" (autocast to float16 with a
GradScaler); "auto" picks what measured fastest (docs/PERFORMANCE.md, "CPU defaults"):

    CUDA                         bf16 where supported, else fp16;  channels_last
    CPU with native bf16         bf16;                             contiguous
      (AMX-BF16 / AVX512-BF16)
    other CPUs                   fp32;                             channels_last

On the 2-core AMX CPU of our CI machines, a digits-preset training step (batch 64) measured
324 img/s in bf16 contiguous, 258 bf16 channels_last, 273 fp32 channels_last and 211 fp32
contiguous (interleaved runs, medians); sampling steps 57, 61, 64 and 80 ms.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda_graphs

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device: expected e.g. 'cpu', 'cuda' or 'cuda:1', got {device!r}"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was requested but torch.cuda.is_available() is False")
    return device


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the autocast dtype (None for fp32) and whether to scale the loss."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaling: bool

    def autocast(self, device: torch.device, cache: bool = True):
        """The autocast context for a forward pass on ``device``.

        ``cache=False`` for regions captured in a CUDA graph: the weight-cast cache must not
        outlive the capture.
        """
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=cache)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            # Native bf16 from Ampere (sm_80) on, on this device; is_bf16_supported() also
            # says yes to emulated bf16 (V100, T4), where fp16 is the fast choice.
            native = torch.cuda.get_device_capability(device)[0] >= 8
            precision = "bf16" if native else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if precision == "fp16":
        return Precision("fp16", torch.float16, True)
    return Precision("fp32", None, False)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AMX-BF16 or AVX512-BF16; Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_channels_last(channels_last, device: torch.device, precision: Precision) -> bool:
    """None / "auto": on for CUDA; on CPU on for fp32 and off for bf16 (as measured)."""
    if channels_last in (None, "auto"):
        return cuda_graphs.on_cuda(device) or precision.autocast_dtype is None
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last: expected True, False or 'auto', got {channels_last!r}")
    return channels_last


def to_channels_last(module: torch.nn.Module) -> None:
    """Put ``module``'s 4-d parameters and buffers in channels_last layout, in place, leaving
    every tensor already laid out so where it is.  ``module.to(memory_format=...)`` instead
    copies each 4-d tensor whose strides fit both layouts, (N, 1, 1, 1) such as a depthwise
    1x1 conv's weight, at every call: the tensor moves, and a captured training step that
    writes the old address (the EMA update) no longer reaches the module."""
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
