"""fastdiff: fast Denoising Diffusion Probabilistic Models (Ho et al. 2020).

    from fastdiff import train, sample

Step indices are 0-based everywhere: ``i = t - 1`` in ``0..T-1`` (see fastdiff.schedule).
"""

from . import ops
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ops"]
__version__ = "0.1.0"
