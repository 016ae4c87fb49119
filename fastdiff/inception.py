"""The FID feature network: where ``inception-2015-12-05.pt`` comes from, checked and loaded.

The file is the TorchScript translation of the TensorFlow Inception-v3 graph of the original
FID code (http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz) that
StyleGAN2-ADA, StyleGAN3, EDM, k-diffusion and clean-fid load.  Its interface::

    net(images, return_features=True) -> (N, 2048) float32 pool features

``images`` is uint8-valued (N, 3, H, W), any H, W: the network resizes to 299x299 and
normalises inside.  Where the file is taken from, first match wins:

1. an explicit path (``--inception PATH``, ``network=`` of fastdiff.metrics);
2. the environment variable ``FASTDIFF_INCEPTION`` (a path);
3. ``$FASTDIFF_CACHE/inception-2015-12-05.pt`` (default cache ``~/.cache/fastdiff``);
4. a download of :data:`URL` into that cache, accepted only if its SHA-256 equals the expected
   one (:data:`SHA256`, or ``FASTDIFF_INCEPTION_SHA256``); a mismatch removes the download.

If none works, :class:`WeightsUnavailable` says in one line where to put the file.  The
network's SHA-256 is part of every cached reference statistic's key (fastdiff.metrics).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write_bytes
from .errors import FastDiffError

FILE_NAME = "inception-2015-12-05.pt"
#: Where StyleGAN2-ADA's metrics/frechet_inception_distance.py and clean-fid's
#: cleanfid/downloads_helper.py fetch the file.
URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{FILE_NAME}"
#: The file's SHA-256.  None: no source that could be cited gave it when this was written
#: (see docs/PERFORMANCE.md, "FID"); until it is filled in, a download is accepted only when
#: FASTDIFF_INCEPTION_SHA256 names the expected hash.  Never put a guessed value here.
SHA256: str | None = None

ENV_PATH = "FASTDIFF_INCEPTION"
ENV_SHA256 = "FASTDIFF_INCEPTION_SHA256"


class WeightsUnavailable(FastDiffError):
    """The feature network cannot be had; the message says where to put the file."""


@dataclass(frozen=True)
class FeatureNetwork:
    """A loaded feature network: the TorchScript ``module`` and its file's ``sha256``."""

    module: torch.nn.Module
    sha256: str
    path: Path


def cache_dir() -> Path:
    """``$FASTDIFF_CACHE`` or ``~/.cache/fastdiff`` (the convention of tools/digits_judge.py)."""
    return Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_sha256() -> str | None:
    """The hash a download must have: :data:`SHA256`, else ``$FASTDIFF_INCEPTION_SHA256``."""
    value = SHA256 or os.environ.get(ENV_SHA256) or None
    return value.strip().lower() if value else None


def _where_to_put() -> str:
    return (
        f"put {FILE_NAME} (from {URL}) at {cache_dir() / FILE_NAME}, or set {ENV_PATH}=PATH"
        " (fastdiff eval: or --inception PATH)"
    )


def fetch(url: str, dest: str | Path, sha256: str) -> Path:
    """Download ``url`` to ``dest`` (atomically) if its bytes hash to ``sha256``; else raise
    :class:`WeightsUnavailable` (nothing is written).  file:// URLs work too."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsUnavailable(
            f"inception: cannot download {url} ({reason}); {_where_to_put()}"
        ) from exc
    got = hashlib.sha256(data).hexdigest()
    if got != sha256.lower():
        raise WeightsUnavailable(
            f"inception: {url} has SHA-256 {got}, expected {sha256.lower()}; not used."
            f" {_where_to_put()}"
        )
    return atomic_write_bytes(dest, data)


def resolve_weights(path: str | Path | None = None, *, download: bool = True) -> Path:
    """The network file to use, by the order in the module docstring (downloading if allowed
    and an expected hash is known).  Raises :class:`WeightsUnavailable`."""
    for given, what in ((path, "--inception"), (os.environ.get(ENV_PATH) or None, ENV_PATH)):
        if given is None:
            continue
        if not Path(given).is_file():
            raise WeightsUnavailable(f"{what}: {str(given)!r} is not a file; {_where_to_put()}")
        return Path(given)
    cached = cache_dir() / FILE_NAME
    expected = expected_sha256()
    if cached.is_file():
        if expected is not None and sha256_file(cached) != expected:
            raise WeightsUnavailable(
                f"inception: {str(cached)!r} does not have the expected SHA-256 {expected}"
                f" (damaged?); delete it. {_where_to_put()}"
            )
        return cached
    if download and expected is not None:
        return fetch(URL, cached, expected)
    why = "no download without a known SHA-256 (set " + ENV_SHA256 + ")" if download else ""
    raise WeightsUnavailable(
        f"inception: {FILE_NAME} not found{'; ' + why if why else ''}; {_where_to_put()}"
    )


def load_network(path: str | Path | None = None, *, device=None,
                 download: bool = True) -> FeatureNetwork:  # fmt: skip
    """Resolve (see :func:`resolve_weights`), hash and load the TorchScript network on
    ``device`` in eval mode."""
    file = resolve_weights(path, download=download)
    try:
        module = torch.jit.load(str(file), map_location=device or "cpu").eval()
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"inception: cannot load {str(file)!r} as TorchScript ({first}); {_where_to_put()}"
        ) from exc
    return FeatureNetwork(module, sha256_file(file), file)
