"""NVTX ranges that name each phase of training and sampling on an Nsight timeline.

``phase("forward")`` pushes a range in the "fastdiff" domain.  Without a profiler attached the
nvtx package makes this a near no-op; where the nvtx package is missing it is a plain no-op.
"""

from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None

DOMAIN = "fastdiff"
#: The phases that the training loop and the sampler mark.
PHASES = ("data", "noising", "forward", "loss", "backward", "optimizer", "EMA", "sampler step")


def phase(name: str):
    """Context manager: an NVTX range called ``name`` in the fastdiff domain."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain=DOMAIN)
