"""The bf16 copy of a denoiser that sampling runs on CUDA, cast once and reused.

With ``precision="bf16"`` on a GPU, sampling a fastdiff UNet in autocast with fp32 weights
re-casts every conv / linear weight on every step (and autocast runs GroupNorm in fp32 with
casts around it).  ``sampling_model`` instead returns a copy whose parameters are bf16 (and
channels_last when asked): convolutions, linears and F.scaled_dot_product_attention then run
on bf16 operands directly, and the fused GroupNorm kernel reads bf16 weights while keeping its
statistics in fp32.  The user's module is never modified.  The copy is cached per source
module and rebuilt when the source's weights change (any in-place update, e.g. an EMA step,
bumps the tensors' version counters) or when the layout differs; a module made under
``torch.inference_mode()`` has no version counters and is cast at every call.  Other models,
precisions and devices get the source module back unchanged (autocast as before).
"""

from __future__ import annotations

import copy
import itertools
import weakref

import torch
from torch import nn

from .precision import Precision
from .unet import UNet

_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module, channels_last: bool) -> tuple | None:
    """What the cached copy was cast from; None when that cannot be told: tensors made under
    ``torch.inference_mode()`` (a model loaded there) keep no version counter, so in-place
    updates to them are invisible and such a model is cast afresh at every call."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(t.is_inference() for t in tensors):
        return None
    return channels_last, tuple((t.data_ptr(), t._version) for t in tensors)


def sampling_model(
    model: nn.Module, precision: Precision, device: torch.device, channels_last: bool
) -> nn.Module:
    """The module to sample with: a cached bf16 copy of ``model`` (eval mode, no grad, in
    ``channels_last`` layout if set) when ``model`` is a fastdiff UNet, ``precision`` is bf16
    and ``device`` is CUDA; otherwise ``model`` itself."""
    if precision.name != "bf16" or device.type != "cuda" or not isinstance(model, UNet):
        return model
    key = _weights_key(model, channels_last)
    cached = _COPIES.get(model)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    fmt = torch.channels_last if channels_last else torch.preserve_format
    bf16 = copy.deepcopy(model).to(dtype=torch.bfloat16, memory_format=fmt)
    bf16.eval().requires_grad_(False)
    if key is None:
        _COPIES.pop(model, None)
    else:
        _COPIES[model] = (key, bf16)
    return bf16
