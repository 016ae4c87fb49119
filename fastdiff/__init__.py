"""fastdiff: fast Denoising Diffusion Probabilistic Models (Ho et al. 2020).

    from fastdiff import train, sample
    diffusion = train("digits", steps=3000, batch_size=64, out_dir="runs/digits")
    images = sample(diffusion, 64, seed=0)          # (64, 1, 16, 16) in [-1, 1]

Step indices are 0-based everywhere: ``i = t - 1`` in ``0..T-1`` (see fastdiff.schedule).
"""

from . import _checkout, ops  # noqa: F401  (_checkout first: mounts kernels/ in a checkout)
from .cuda_graphs import GraphCaptureError
from .diffusion import Diffusion, load, sample
from .errors import OutputError
from .images import save_image_grid
from .preemption import TrainingInterrupted
from .schedule import NoiseSchedule
from .training import train
from .unet import UNet

__all__ = [
    "Diffusion",
    "GraphCaptureError",
    "NoiseSchedule",
    "OutputError",
    "TrainingInterrupted",
    "UNet",
    "load",
    "ops",
    "sample",
    "save_image_grid",
    "train",
]
__version__ = "0.1.0"
