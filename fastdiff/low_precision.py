"""The bf16 copy of a denoiser that sampling runs on CUDA, cast once and refreshed per call.

With ``precision="bf16"`` on a GPU, sampling a fastdiff UNet in autocast with fp32 weights
re-casts every conv / linear weight on every step (and autocast runs GroupNorm in fp32 with
casts around it).  ``sampling_model`` instead returns a copy whose parameters are bf16 (and
channels_last when asked): convolutions, linears and F.scaled_dot_product_attention then run
on bf16 operands directly, and the fused GroupNorm kernel reads bf16 weights while keeping its
statistics in fp32.  The user's module is never modified.

The copy is cached per source module (its structure: layout, and each tensor's device, shape
and dtype) and its weights are copied from the source at every call, one multi-tensor cast
(``torch._foreach_copy_``), cheap next to the model calls of one sampling run.  Version
counters cannot tell when to refresh: writes through ``.data``, collective ops and raw-pointer
writers change weights without bumping them.  A copy whose structure no longer matches (the
source moved, the layout differs) is dropped before the new one is made, and the new one is
cast tensor by tensor, so at most one extra bf16 model is alive.  Other models, precisions and
devices get the source module back unchanged (autocast as before).
"""

from __future__ import annotations

import copy
import itertools
import weakref

import torch
from torch import nn

from . import cuda_graphs
from .precision import Precision
from .unet import UNet

_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def _structure(tensors: list[torch.Tensor], channels_last: bool) -> tuple:
    """What a cached copy's shape depends on (not the values, which are copied every call)."""
    return channels_last, tuple((t.device, t.dtype, tuple(t.shape)) for t in tensors)


def _cast_copy(model: nn.Module, tensors: list[torch.Tensor], channels_last: bool) -> nn.Module:
    """A deep copy of ``model`` with floating tensors in bf16 (4-d ones channels_last if asked),
    cast one tensor at a time (no fp32 clone of the whole model); eval mode, no grad."""
    memo = {}
    for t in tensors:
        if t.is_floating_point():
            fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
            cast = t.detach().to(torch.bfloat16, memory_format=fmt)
            memo[id(t)] = nn.Parameter(cast, False) if isinstance(t, nn.Parameter) else cast
    bf16 = copy.deepcopy(model, memo)
    return bf16.eval().requires_grad_(False)


def sampling_model(
    model: nn.Module, precision: Precision, device: torch.device, channels_last: bool
) -> nn.Module:
    """The module to sample with: the cached bf16 copy of ``model`` with ``model``'s current
    weights (eval mode, no grad, 4-d weights in ``channels_last`` layout if set) when ``model``
    is a fastdiff UNet, ``precision`` is bf16 and ``device`` is CUDA; otherwise ``model``."""
    if precision.name != "bf16" or not isinstance(model, UNet) or not cuda_graphs.on_cuda(device):
        return model
    source = _tensors(model)
    key = _structure(source, channels_last)
    cached = _COPIES.get(model)
    if cached is not None and cached[0] == key:
        bf16 = cached[1]
        # inference mode: the copy may have been made there (then only it may write to it)
        with torch.inference_mode():
            torch._foreach_copy_(_tensors(bf16), source)
        return bf16
    del cached  # free the old copy (this and the cache's reference) before casting the new one
    _COPIES.pop(model, None)
    bf16 = _cast_copy(model, source, channels_last)
    _COPIES[model] = (key, bf16)
    return bf16
