"""Device and numeric-precision choices for training and sampling.

Precisions: "fp32"; "bf16" (autocast to bfloat16); "fp16" (autocast to float16 with a
GradScaler); "auto" picks what measured fastest: bf16 on CUDA devices that support it, else
fp16; fp32 on CPU, where bf16 autocast measured slower for models of this size (DESIGN.md
section 5, and docs/PERFORMANCE.md).  channels_last "auto" is on for CUDA and off on CPU for
the same reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

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

    def autocast(self, device: torch.device):
        """The autocast context for a forward pass on ``device``."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if precision == "fp16":
        return Precision("fp16", torch.float16, True)
    return Precision("fp32", None, False)


def resolve_channels_last(channels_last, device: torch.device) -> bool:
    if channels_last in (None, "auto"):
        return device.type == "cuda"
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last: expected True, False or 'auto', got {channels_last!r}")
    return channels_last


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
