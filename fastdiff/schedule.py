"""Noise schedules: the betas of the forward process and every table derived from them.

Index convention (as in diffusers and improved-diffusion): arrays are indexed by the 0-based
step ``i = t - 1`` in ``0..T-1``.  ``betas[i]`` is beta_{i+1} and ``alphas_cumprod[i]`` is

    alpha_{i+1} = prod_{tau=1..i+1} (1 - beta_tau)            ("alpha_bar" elsewhere)

so index 0 is the last, noise-free step of sampling and index T-1 the first.

All tables are computed once in float64 on the CPU.  ``betas`` and ``alphas_cumprod`` (and the
other public float64 tables) live on the schedule's device in float64; the coefficients that the
kernels read are also kept as float32 copies (``table(name)``), cast once, on the same device,
so that a kernel can index them with a device tensor ``t`` and no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

#: Coefficient tables derived from the betas (float64 formulas in ``_derive``).
TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "reverse_coef_z",
    "reverse_coef_eps",
    "sigma_beta",
    "posterior_variance",
    "sigma_posterior",
    "posterior_mean_coef_x0",
    "posterior_mean_coef_z",
)


def _derive(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All tables, float64, indexed by the 0-based step i (see module docstring)."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        # predicted x0 = sqrt_recip z - sqrt_recipm1 eps = (z - sqrt(1 - alpha) eps) / sqrt(alpha)
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        # mu = (z - beta / sqrt(1 - alpha_t) * eps) / sqrt(1 - beta) = coef_z * z - coef_eps * eps
        "reverse_coef_z": 1.0 / np.sqrt(alphas),
        "reverse_coef_eps": betas / (np.sqrt(1.0 - ac) * np.sqrt(alphas)),
        "sigma_beta": np.sqrt(betas),
        "posterior_variance": posterior_variance,
        "sigma_posterior": np.sqrt(posterior_variance),
        # posterior mean of q(z_{t-1} | z_t, x) = coef_x0 * x + coef_z * z_t
        "posterior_mean_coef_x0": np.sqrt(ac_prev) * betas / (1.0 - ac),
        "posterior_mean_coef_z": np.sqrt(alphas) * (1.0 - ac_prev) / (1.0 - ac),
    }


def _validate_betas(betas) -> np.ndarray:
    if isinstance(betas, torch.Tensor):
        betas = betas.detach().cpu().double().numpy()
    try:
        arr = np.asarray(betas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"betas: expected a 1-D sequence of numbers, got {type(betas)}") from exc
    if arr.ndim != 1:
        raise ValueError(f"betas: expected a 1-D sequence, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("betas: expected at least one step, got an empty sequence")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"betas: every beta must be finite, betas[{bad}] = {arr[bad]}")
    outside = np.flatnonzero((arr <= 0.0) | (arr >= 1.0))
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"betas: every beta must lie in the open interval (0, 1), betas[{i}] = {arr[i]}"
            f" ({outside.size} value(s) outside)"
        )
    return arr


class NoiseSchedule:
    """The variance schedule beta_1..beta_T of a DDPM and its derived tables.

    Build one with ``NoiseSchedule.linear()``, ``NoiseSchedule.cosine()`` or
    ``NoiseSchedule(betas)``; move it next to your data with ``.to(device)``.

    Attributes (all indexed by the 0-based step ``i = t - 1``, shape ``(T,)``):
        betas, alphas_cumprod, alphas_cumprod_prev, ... (float64, on ``device``); see
        ``TABLE_NAMES``.  ``table(name)`` gives the float32 copy the kernels read.
        T: number of diffusion steps.
        name: "linear", "cosine" or "custom" (recorded in checkpoints).
    """

    def __init__(self, betas: Sequence[float] | np.ndarray | torch.Tensor, *, name="custom"):
        arr = _validate_betas(betas)
        self.name = name
        self.T = int(arr.size)
        self._np = _derive(arr)
        self._place(torch.device("cpu"))

    def _place(self, device: torch.device) -> None:
        self._f64 = {k: torch.from_numpy(v).to(device) for k, v in self._np.items()}
        self._f32 = {k: v.float() for k, v in self._f64.items()}
        # Where the tables actually are ("cuda" resolves to "cuda:<current>").
        self.device = self._f64["betas"].device

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. 2020: betas evenly spaced from beta_start to beta_end over T steps."""
        T = _check_T(T)
        return cls(np.linspace(beta_start, beta_end, T, dtype=np.float64), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2.

        beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta) for t = 1..T.
        """
        T = _check_T(T)
        steps = np.arange(T + 1, dtype=np.float64)
        f = np.cos((steps / T + s) / (1.0 + s) * math.pi / 2.0) ** 2
        alpha_bar = f / f[0]
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
        return cls(betas, name="cosine")

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> NoiseSchedule:
        """``"linear"`` or ``"cosine"`` with T steps."""
        makers = {"linear": cls.linear, "cosine": cls.cosine}
        if name not in makers:
            raise ValueError(f"schedule: expected one of {sorted(makers)}, got {name!r}")
        return makers[name](T)

    # -- access -----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> torch.Tensor:
        # Only called for attributes not found normally: expose the float64 tables.
        tables = self.__dict__.get("_f64")
        if tables is not None and name in tables:
            return tables[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def table(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Table ``name`` (one of TABLE_NAMES) as float32 (cast once) or float64, on ``device``."""
        if name not in self._f64:
            raise KeyError(f"unknown schedule table {name!r}; known: {TABLE_NAMES}")
        if dtype == torch.float64:
            return self._f64[name]
        if dtype == torch.float32:
            return self._f32[name]
        raise ValueError(f"dtype: schedule tables exist in float32 and float64, not {dtype}")

    def to(self, device) -> NoiseSchedule:
        """A copy of this schedule whose tables live on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        other = object.__new__(type(self))
        other.name, other.T, other._np = self.name, self.T, self._np
        other._place(device)
        return other

    def config(self) -> dict:
        """JSON-serialisable description: ``NoiseSchedule.from_config(s.config())`` rebuilds it."""
        return {"name": self.name, "betas": self._np["betas"].tolist()}

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        return cls(config["betas"], name=config.get("name", "custom"))

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        b = self._np["betas"]
        return (
            f"NoiseSchedule(name={self.name!r}, T={self.T}, beta=[{b[0]:.3g}..{b[-1]:.3g}],"
            f" device={self.device})"
        )


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T: expected a positive integer number of steps, got {T!r}")
    return int(T)
