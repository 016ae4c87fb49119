"""FID (and KID) during training: ``train(..., fid_every=N, fid_samples=M)``.

At every N-th step the run's EMA model draws M images with fastdiff.metrics.sample_features
(the default FID sampler, its steps capped at T; only one sampling batch of images is held at
a time) and their features are compared with the statistics of the
first M training images (cached by fastdiff.metrics.reference_stats).  Each measurement is one
metrics.jsonl record ``{"step", "fid", "kid", "kid_std", "fid_samples", "best_fid",
"best_fid_step"}``; the best (lowest) FID and its step are also kept in the run's config as
``fid_best = {"fid", "step"}`` (config.json of every checkpoint; restored on resume).
"""

from __future__ import annotations

import time

import torch

from . import metrics
from .errors import DataError
from .inception import load_network


class FIDMonitor:
    """The feature network and reference statistics of one run, and its best FID so far."""

    def __init__(self, source, n: int, device, *, network=None):
        if not isinstance(source, torch.Tensor):
            raise DataError(
                "fid_every: FID during training needs the data as images (a tensor, .npz,"
                " folder or built-in name), not a Dataset"
            )
        self.network = network or load_network(device=device)  # before any training
        self.n = n
        self.reference = metrics.reference_stats(source, n=min(n, source.shape[0]),
                                                 network=self.network)  # fmt: skip
        self.best: dict | None = None
        self.last: float | None = None  # the latest FID (progress bar)

    def measure(self, diffusion, step: int, *, seed: int, **sample_kwargs) -> dict:
        """FID/KID of ``n`` EMA samples of ``diffusion`` at ``step``; updates ``best``."""
        sampler = metrics.default_sampler(diffusion.schedule.T)
        features = metrics.sample_features(diffusion, self.n, self.network, sampler, seed=seed,
                                           use_ema=True, **sample_kwargs)  # fmt: skip
        stats = metrics.FeatureStats.of(features)
        ref = self.reference
        fid = metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        kid = metrics.kid(stats, ref, device=diffusion.device)
        self.last = fid
        if self.best is None or fid < self.best["fid"]:
            self.best = {"fid": fid, "step": step}
        return {
            "step": step,
            "fid": fid,
            "kid": kid.mean,
            "kid_std": kid.std,
            "fid_samples": self.n,
            "best_fid": self.best["fid"],
            "best_fid_step": self.best["step"],
            "time": time.time(),
        }
