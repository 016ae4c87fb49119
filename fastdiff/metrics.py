"""FID and KID on Inception-v3 pool features, as the field computes them.

Features: images -> uint8 (``fastdiff.images.to_uint8``, exactly like a saved PNG), grayscale
repeated to 3 channels, then the feature network of fastdiff.inception,
``net(x_uint8, return_features=True)`` -> (N, D) (D = 2048), in batches on the network's device.

FID (Heusel et al. 2017) between Gaussians fitted to two feature sets, float64 throughout::

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)

mu the mean (D,), S the covariance (D, D) with the 1/(N-1) normalisation (np.cov).  The trace
of the matrix square root is taken in symmetric form: tr((S1 S2)^1/2) = sum_i sqrt(l_i) with
l_i the eigenvalues of A S2 A, A = S1^1/2 (both from ``eigh``, so no non-symmetric sqrtm and
no complex arithmetic; singular S1, e.g. N < D, is fine).  A S2 A is positive semi-definite, so
negative l_i are rounding: their sqrt is the imaginary residue that the reference codes drop
(StyleGAN2-ADA: ``np.real``; pytorch-fid: drops it unless a diagonal entry's imaginary part
exceeds 1e-3, then raises).  Here: dropped, and ValueError if sqrt(-min l_i) > 1e-3.

KID (Binkowski et al. 2018), as StyleGAN2-ADA's kernel_inception_distance: ``num_subsets``
times, m = min(N1, N2, max_subset_size) rows drawn without replacement from each set, kernel
k(x, y) = (x.y / D + 1)^3, and the unbiased MMD^2 estimate::

    MMD^2 = [sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)] / (m (m-1))
            - 2 sum_{i,j} k(x_i, y_j) / m^2

reported as the mean over subsets and their standard deviation (numpy's, ddof=0).

Reference statistics (:func:`reference_stats`) are cached in ``$FASTDIFF_CACHE/fid-refs/``
(default ``~/.cache/fastdiff``), keyed by the SHA-256 of the reference uint8 images, the
network file's SHA-256 and n, so a second evaluation only samples and extracts its own images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_bytes
from .data import resolve_data
from .errors import DataError
from .images import to_model_range, to_uint8
from .inception import FeatureNetwork, cache_dir, load_network
from .precision import resolve_precision
from .progress import progress_bar
from .validation import require_int

__all__ = [
    "DEFAULT_FID_SAMPLER",
    "default_sampler",
    "FeatureStats",
    "KID",
    "extract_features",
    "frechet_distance",
    "fid",
    "kid",
    "reference_stats",
    "sample_features",
    "evaluate",
]

#: The sampler spec (name, steps) that FID evaluation uses unless told otherwise.
DEFAULT_FID_SAMPLER = ("dpm++2m", 20)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
#: Largest imaginary residue of the matrix square root that is dropped (as pytorch-fid).
IMAGINARY_TOLERANCE = 1e-3
_CACHE_VERSION = 1


@dataclass
class FeatureStats:
    """Features of one image set: ``mu`` (D,) and ``sigma`` (D, D) float64, and the
    ``features`` themselves (N, D) as given (float32 from the network; KID needs them)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray

    @classmethod
    def of(cls, features) -> FeatureStats:
        f = _feature_array(features, "features")
        if f.shape[0] < 2:
            raise ValueError(f"features: expected at least 2 rows, got shape {f.shape}")
        f64 = f.astype(np.float64)
        return cls(f64.mean(axis=0), np.cov(f64, rowvar=False), f)

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, features=self.features)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], z["features"])


class KID(tuple):
    """(mean, std) of the per-subset unbiased MMD^2 estimates."""

    __slots__ = ()

    def __new__(cls, mean: float, std: float):
        return super().__new__(cls, (float(mean), float(std)))

    mean = property(lambda self: self[0])
    std = property(lambda self: self[1])


# -- features -------------------------------------------------------------------------------


def network_input(images) -> torch.Tensor:
    """Images (N, C, H, W), float in [-1, 1] or uint8, C = 1 or 3 -> uint8 (N, 3, H, W) as a
    saved PNG holds them (grayscale repeated to 3 channels)."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    x = to_uint8(to_model_range(x, name="images")) if x.dtype != torch.uint8 else x
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _network(network, device=None) -> FeatureNetwork:
    if isinstance(network, FeatureNetwork):
        return network
    if network is None or isinstance(network, (str, Path)):
        return load_network(network, device=device)
    raise TypeError(
        f"network: expected a FeatureNetwork, a path or None, got {type(network).__name__}"
    )


def extract_features(images, network=None, *, batch_size: int = 100, device=None,
                     progress: bool = False) -> np.ndarray:  # fmt: skip
    """Feature-network outputs for ``images`` (see :func:`network_input`): (N, D) float32.
    ``network``: a FeatureNetwork, a path, or None (fastdiff.inception's search order)."""
    require_int("batch_size", batch_size)
    x = network_input(images)
    net = _network(network, device)
    weight = next(iter(net.module.parameters()), None)
    own = torch.device("cpu") if weight is None else weight.device
    dev = own if device is None else torch.device(device)
    if weight is not None and own.type != dev.type:
        raise ValueError(
            f"device: {dev} but the network's weights are on {own}: load it there"
            f" (load_network(device={str(dev)!r})) or pass device=None"
        )
    out = []
    bar = progress_bar(x.shape[0], desc="features", unit="img", enabled=progress)
    try:
        with torch.inference_mode(), full_fp32():
            for start in range(0, x.shape[0], batch_size):
                batch = x[start : start + batch_size].to(dev)
                f = _run_network(net.module, batch)
                if f.ndim != 2 or f.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"network: expected (N, D) features for {batch.shape[0]} images,"
                        f" got shape {tuple(f.shape)}"
                    )
                out.append(f.float().cpu().numpy())
                bar.update(batch.shape[0])
    finally:
        bar.close()
    return np.concatenate(out)


@contextlib.contextmanager
def full_fp32():
    """fp32 convolutions and matmuls as IEEE fp32, not TF32, for the duration (restored after):
    torch lets cuDNN convolutions use TF32 by default, a 10-bit mantissa that shifts the
    Inception features by ~1e-3 and FID with them on Ampere and later GPUs (StyleGAN2-ADA's
    metrics turn it off too).  torch's newer per-backend ``fp32_precision`` settings where
    present (setting the legacy flags beside them makes torch refuse to read either)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def _run_network(module, batch: torch.Tensor) -> torch.Tensor:
    """One batch through the TorchScript network (StyleGAN2-ADA's call convention)."""
    return module(batch, return_features=True)


def _feature_array(features, name: str) -> np.ndarray:
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    f = np.asarray(f)
    if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
        raise ValueError(f"{name}: expected a float array (N, D), got {f.dtype} {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: contains non-finite values")
    return f


def _stats(x, name: str, network, **kw) -> FeatureStats:
    """FeatureStats from stats, a feature array (N, D) or images (N, C, H, W)."""
    if isinstance(x, FeatureStats):
        return x
    if np.ndim(x) == 4:
        return FeatureStats.of(extract_features(x, network, **kw))
    if np.ndim(x) == 2:
        return FeatureStats.of(_feature_array(x, name))
    raise ValueError(
        f"{name}: expected FeatureStats, features (N, D) or images (N, C, H, W), got"
        f" {np.ndim(x)} dimension(s)"
    )


# -- the two distances ----------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64 (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"stats: expected mu (D,) and sigma (D, D) of one D, got {mu1.shape}, {s1.shape},"
            f" {mu2.shape}, {s2.shape}"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    residue = math.sqrt(max(-float(eig.min()), 0.0))
    if residue > IMAGINARY_TOLERANCE:
        raise ValueError(f"fid: the matrix square root has an imaginary component {residue:.3g}")
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid(a, b, *, network=None, batch_size: int = 100, device=None) -> float:
    """FID between ``a`` and ``b``, each FeatureStats, features (N, D) or images
    (N, C, H, W) (float in [-1, 1] or uint8; images need the feature ``network``)."""
    sa = _stats(a, "a", network, batch_size=batch_size, device=device)
    sb = _stats(b, "b", network, batch_size=batch_size, device=device)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def kid(a, b, *, network=None, num_subsets: int = KID_SUBSETS,
        max_subset_size: int = KID_SUBSET_SIZE, seed: int = 0, batch_size: int = 100,
        device=None) -> KID:  # fmt: skip
    """KID(mean, std) between ``a`` and ``b`` (as for :func:`fid`); subsets drawn with
    ``np.random.default_rng(seed)``.  The kernel sums run in float64 on ``device`` if it is
    a CUDA device, else on the CPU: 100 subsets of 1000 x 2048 features are 1.2 TFLOP, ~25 s
    on one core (torchrun sets one thread per process), well under a second on a GPU."""
    require_int("num_subsets", num_subsets)
    require_int("max_subset_size", max_subset_size, 2)
    x = _stats(a, "a", network, batch_size=batch_size, device=device).features
    y = _stats(b, "b", network, batch_size=batch_size, device=device).features
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"b: expected {x.shape[1]} features per row, got {y.shape[1]}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    dev = dev if dev.type == "cuda" else torch.device("cpu")  # float64 (MPS has none)
    d = x.shape[1]
    m = min(x.shape[0], y.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    xt, yt = (torch.from_numpy(np.ascontiguousarray(f)).to(dev) for f in (x, y))
    mmd = np.empty(num_subsets)
    for k in range(num_subsets):
        xs = xt[torch.from_numpy(rng.choice(x.shape[0], m, replace=False)).to(dev)].double()
        ys = yt[torch.from_numpy(rng.choice(y.shape[0], m, replace=False)).to(dev)].double()
        kxx = (xs @ xs.T / d + 1) ** 3
        kyy = (ys @ ys.T / d + 1) ** 3
        kxy = (xs @ ys.T / d + 1) ** 3
        same = kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()
        mmd[k] = (same / (m * (m - 1)) - 2 * kxy.sum() / m**2).item()
    return KID(mmd.mean(), mmd.std())


# -- reference statistics -------------------------------------------------------------------


def reference_stats(data, *, n: int | None = None, network=None, cache: bool = True,
                    batch_size: int = 100, device=None,
                    progress: bool = False) -> FeatureStats:  # fmt: skip
    """Statistics of the first ``n`` (None: all) images of ``data`` (a built-in name such as
    "digits", a folder of images, an .npz/.npy file, or a tensor / array; fastdiff.data's
    loaders), cached on disk (see the module docstring; ``cache=False``: neither read nor
    written)."""
    if n is not None:
        require_int("n", n, 2)
    images = resolve_data(data) if not isinstance(data, torch.Tensor) else data
    if not isinstance(images, torch.Tensor):
        raise DataError("ref: expected images (a built-in name, folder, .npz or a tensor)")
    pixels = network_input(images[:n] if n is not None else images).contiguous()
    if pixels.shape[0] < 2:
        raise DataError(f"ref: expected at least 2 images, got {pixels.shape[0]}")
    net = _network(network, device)
    path = _cache_path(pixels, net.sha256, n)
    if cache and path.is_file():
        try:
            return FeatureStats.load(path)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and replaced
    stats = FeatureStats.of(
        extract_features(pixels, net, batch_size=batch_size, device=device, progress=progress)
    )
    if cache:
        atomic_write_bytes(path, stats.to_bytes())
    return stats


def _cache_path(pixels: torch.Tensor, network_sha256: str, n: int | None) -> Path:
    """``fid-refs/<key>.npz``, key = SHA-256 of (the uint8 images and their shape, the
    network's SHA-256, n, the cache format version)."""
    digest = hashlib.sha256(pixels.cpu().numpy().tobytes())
    digest.update(json.dumps([list(pixels.shape), network_sha256, n, _CACHE_VERSION]).encode())
    return cache_dir() / "fid-refs" / f"{digest.hexdigest()[:32]}.npz"


# -- from a model ---------------------------------------------------------------------------


def default_sampler(T: int) -> tuple[str, int]:
    """:data:`DEFAULT_FID_SAMPLER` with its steps capped at the model's T."""
    name, steps = DEFAULT_FID_SAMPLER
    return name, min(steps, T - 1 if name == "dpm++2m" else T)


def sample_features(diffusion, n: int, network, sampler=DEFAULT_FID_SAMPLER, *, seed: int = 0,
                    batch_size: int = 100, progress: bool = False,
                    **sample_kwargs) -> np.ndarray:  # fmt: skip
    """Features (n, D) of ``n`` images of ``diffusion`` drawn with ``sampler`` = (name, steps):
    the one place FID evaluation calls the samplers (``fastdiff.diffusion.iter_samples``).

    Each sampling batch becomes uint8 and features (``batch_size`` images per network call)
    before the next one is drawn, so only one batch of images is held at a time (50k samples
    of 256x256 RGB would be 39 GB as float32).  The images are those of ``fastdiff.sample``
    with the same arguments."""
    from .diffusion import iter_samples

    net = _network(network, diffusion.device)
    name, steps = sampler
    batches = iter_samples(diffusion, n, sampler=name, steps=steps, seed=seed,
                           progress=progress, **sample_kwargs)  # fmt: skip
    # closing: a failure here ends the sampling at once (model mode, progress bar, graphs)
    # instead of whenever the traceback that holds the generator goes.
    with contextlib.closing(batches):
        return np.concatenate(
            [extract_features(images, net, batch_size=batch_size) for images in batches]
        )


def evaluate(diffusion, *, ref, n: int = 50000, sampler=DEFAULT_FID_SAMPLER, with_kid=False,
             network=None, seed: int = 0, batch_size: int = 100, use_ema: bool = True,
             precision: str = "auto", progress: bool = False) -> dict:  # fmt: skip
    """FID (and KID) of ``n`` samples of ``diffusion`` against ``ref`` (anything
    :func:`reference_stats` takes, or FeatureStats), with the network loaded before any work.
    ``precision``: the model's autocast while sampling ("auto": bf16 on a recent GPU, which
    can move FID slightly against fp32; the result names the one used).

    Returns {"fid", "n", "ref_n", "sampler", "steps", "precision"} (+ "kid", "kid_std" with
    ``with_kid``).
    """
    require_int("n", n, 2)
    used = resolve_precision(precision, diffusion.device).name  # also checks the name
    net = _network(network, diffusion.device)
    ref_stats = (
        ref
        if isinstance(ref, FeatureStats)
        else reference_stats(ref, n=n, network=net, batch_size=batch_size, progress=progress)
    )
    features = sample_features(diffusion, n, net, sampler, seed=seed, batch_size=batch_size,
                               use_ema=use_ema, precision=used, progress=progress)  # fmt: skip
    stats = FeatureStats.of(features)
    result = {
        "fid": frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma),
        "n": n,
        "ref_n": ref_stats.n,
        "sampler": sampler[0],
        "steps": sampler[1],
        "precision": used,
    }
    if with_kid:
        result["kid"], result["kid_std"] = kid(stats, ref_stats, device=diffusion.device)
    return result
