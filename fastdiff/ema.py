"""Exponential moving average of model weights (the weights that sampling uses by default).

    ema <- decay_k * ema + (1 - decay_k) * w,   decay_k = min(decay, (1 + k) / (k + power + 2))

The warm-up of decay_k lets short runs have useful EMA weights: until decay_k reaches
``decay``, the average at step K weights the weights of step j by about (j / K)^power (the
"power function" profile of Karras et al. 2024, EDM2), whatever K is.  ``power = 8`` is
diffusers' EMAModel warm-up, (1 + k) / (10 + k): the average sits at about 0.9 K with a
spread (relative standard deviation) of 0.09 K.  A smaller power averages over a longer tail:
power = 0 gives the plain mean of all weights so far, and the spread is
sqrt((power + 1) / ((power + 2)^2 (power + 3))) K.  (With ``decay = 0.9999`` the cap is reached
only after about (power + 1) * 10^4 steps.)
One fused multi-tensor lerp per step (torch._foreach_lerp_), no host synchronisation.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

#: diffusers' EMAModel warm-up, (1 + k) / (10 + k).
DEFAULT_POWER = 8.0


def check_power(power) -> None:
    """``ema_power`` must be a finite number >= 0 (the profile (j / K)^power)."""
    if (
        isinstance(power, bool)
        or not isinstance(power, (int, float))
        or not (math.isfinite(power) and power >= 0)
    ):
        raise ValueError(f"ema_power: expected a finite number >= 0, got {power!r}")


class EMA:
    """Keeps ``shadow``, a frozen copy of ``model`` whose floating weights track the average
    of ``model``'s (the tensors are bound at construction: load new weights in place)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, power: float = DEFAULT_POWER):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {decay}")
        check_power(power)
        self.decay = decay
        self.power = float(power)
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = [
            (s, p)
            for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True)
            if p.dtype.is_floating_point
        ]
        self._shadow_params = [s for s, _ in pairs]
        self._model_params = [p for _, p in pairs]
        self._buffers = list(zip(self.shadow.buffers(), model.buffers(), strict=True))

    def decay_at(self, step: int) -> float:
        """decay_k = min(decay, (1 + k) / (k + power + 2)) for the 0-based step k."""
        return min(self.decay, (1.0 + step) / (step + (self.power + 2.0)))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the model's current weights (``step``: 0-based count)."""
        if self._shadow_params:
            torch._foreach_lerp_(self._shadow_params, self._model_params, 1.0 - self.decay_at(step))
        for shadow_buf, model_buf in self._buffers:
            shadow_buf.copy_(model_buf)

    @torch.no_grad()
    def update_with(self, weight: torch.Tensor) -> None:
        """The same update with ``weight`` = 1 - decay_k as a 0-dim fp32 tensor on the weights'
        device, ema <- ema + weight * (w - ema): no host scalar, so a CUDA graph can capture it
        (fastdiff.train_graph).  Three multi-tensor kernels (torch has no _foreach_lerp_ with
        a tensor weight), equal to ``update`` up to rounding."""
        if self._shadow_params:
            delta = torch._foreach_sub(self._model_params, self._shadow_params)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(self._shadow_params, delta)
        for shadow_buf, model_buf in self._buffers:
            shadow_buf.copy_(model_buf)
