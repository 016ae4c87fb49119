"""Classifier-free guidance (Ho & Salimans 2022) of a class-conditional model.

    eps = eps_u + s (eps_c - eps_u)        (diffusers' convention: s = 1 is the conditional
                                            model alone, s = 0 the unconditional one)

eps_c = model(z, t, y) and eps_u = model(z, t, null) (the learned null class, label K of a
model with K classes; fastdiff.labels).  For s != 1 the runner makes one model call on 2B
rows, model([z; z], [t; t], [y; null]) -> [eps_c; eps_u], and hands the two halves (views)
to the sampler's fused step as ``pred`` / ``pred_uncond``: the kernel forms eps in registers,
never storing it.  s == 1 calls the model on the B conditional rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..labels import check_labels

#: sample()'s guidance scale for a class-conditional model when none is given: chosen from
#: the class-accuracy / judge-FD table in docs/PERFORMANCE.md ("Classifier-free guidance").
DEFAULT_GUIDANCE_SCALE = 2.0


@dataclass(frozen=True)
class Guidance:
    """How a class-conditional model is sampled: its ``num_classes`` K (labels 0..K-1; K is
    the null class) and the guidance ``scale`` s."""

    num_classes: int
    scale: float = 1.0

    @property
    def batched(self) -> bool:
        """Whether a step needs the unconditional prediction too (one model call on 2B)."""
        return self.scale != 1.0


def check_guidance_args(num_classes: int | None, labels, guidance_scale, n: int):
    """sample()'s ``labels`` / ``guidance_scale`` for a model with ``num_classes`` (None:
    unconditional), checked before any work: (labels (n,) int64 CPU tensor or None, Guidance
    or None).  ``labels``: an int (every image) or one per image; None with a conditional
    model means the null class (the unconditional model; the scale is then moot)."""
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels: this model is unconditional (no num_classes); omit labels")
        if guidance_scale not in (None, 1, 1.0):
            raise ValueError(
                f"guidance_scale: needs a class-conditional model, got {guidance_scale!r}"
            )
        return None, None
    if guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE_SCALE
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    if labels is None:
        return None, Guidance(num_classes, 1.0)
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels] * n
    labels = check_labels(labels, n, num_classes, name="labels")
    return labels, Guidance(num_classes, float(guidance_scale))
