"""FID / KID (fastdiff.metrics) and the feature network's file (fastdiff.inception).

A small TorchScript network with the interface of inception-2015-12-05.pt (uint8 (N, 3, H, W)
in, resized inside, ``return_features=True`` -> (N, D) float32) stands in for Inception-v3.
References are independent: scipy.linalg.sqrtm of S1 S2 as StyleGAN2-ADA computes FID, the
MMD^2 U-statistic summed over explicit index pairs, features from calling the network here.
Tolerances: float64 arithmetic on O(1) features; the two FID routes (eigh of A S2 A vs a Schur
sqrtm of S1 S2) agree to ~1e-12 relative, checked at 1e-9.
"""

import hashlib
import itertools

import numpy as np
import pytest
import torch
from helpers import DEVICE, own_features, save_fake_inception, scipy_fid
from helpers import FAKE_INCEPTION_DIM as DIM

from fastdiff import inception, metrics
from fastdiff.cli import main
from fastdiff.inception import FeatureNetwork, WeightsUnavailable


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "fake-inception.pt"
    save_fake_inception(path)
    return path


@pytest.fixture
def env(monkeypatch, tmp_path, net_file):
    """An empty cache in tmp_path and the fake network via FASTDIFF_INCEPTION."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(inception.ENV_PATH, str(net_file))
    monkeypatch.delenv(inception.ENV_SHA256, raising=False)
    return tmp_path / "cache"


def two_feature_sets(seed=0, n=(400, 300)):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n[0], DIM))
    mix = np.eye(DIM) + 0.3 * rng.standard_normal((DIM, DIM))
    b = rng.standard_normal((n[1], DIM)) @ mix + 0.2
    return a, b


def test_fid_equals_scipy_on_the_same_features():
    a, b = two_feature_sets()
    expected = scipy_fid(a, b)
    assert expected > 0.5
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-9)
    assert metrics.fid(a.astype(np.float32), b) == pytest.approx(
        scipy_fid(a.astype(np.float32).astype(np.float64), b), rel=1e-9
    )


def test_fid_on_images_uses_png_pixels_and_gray_as_rgb(env, net_file):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 8, 8, generator=gen) * 2 - 1
    y = (torch.rand(60, 1, 8, 8, generator=gen) * 1.6 - 1).clamp(-1, 1)
    expected = scipy_fid(own_features(net_file, x), own_features(net_file, y))
    # The features are fp32 and own_features takes one batch where fid() takes 16 or 7: the
    # CPU library may pick other conv/matmul kernels per batch shape (seen: 2e-8 relative on
    # one Xeon, 0 on an EPYC), a few fp32 roundings of the features, so not rel=1e-9.
    assert metrics.fid(x, y, batch_size=16) == pytest.approx(expected, rel=1e-6)
    rgb = x.repeat(1, 3, 1, 1)  # the same images as RGB: the same features
    assert metrics.fid(rgb, y, batch_size=7) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a, b = two_feature_sets(seed=1)
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(metrics.fid(a, a)) < 1e-12 * scale
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-12)
    # N < D: a singular covariance.  Its null eigenvalues come out as +-eps * scale, and their
    # square roots (the trace of the sqrt) as sqrt(eps * scale): the bound is D of those.
    few = a[:5]
    assert abs(metrics.fid(few, few)) < DIM * np.sqrt(np.finfo(float).eps * scale) * np.sqrt(scale)


def test_imaginary_residue_beyond_tolerance_is_an_error():
    mu = np.zeros(DIM)
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(mu, np.eye(DIM), mu, -1e-4 * np.eye(DIM))
    # A residue below 1e-3 (sqrt(1e-8) = 1e-4) is dropped, as the reference codes do:
    # FID = tr(S1) + tr(S2) - 2 * 0.
    fid = metrics.frechet_distance(mu, np.eye(DIM), mu, -1e-8 * np.eye(DIM))
    assert fid == pytest.approx(DIM * (1 - 1e-8), rel=1e-15)


def test_kid_is_the_unbiased_mmd_over_index_pairs():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, DIM)), rng.standard_normal((12, DIM)) + 0.5

    def k(u, v):
        return (u @ v / DIM + 1) ** 3

    m = 12
    pairs = list(itertools.permutations(range(m), 2))
    expected = (
        sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
        - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    )
    # One subset of all 12 rows of each: a permutation, which MMD^2 does not see.  The sums
    # run on DEVICE (the GPU in a CUDA run), in float64 there too.
    mean, std = metrics.kid(x, y, num_subsets=1, max_subset_size=100, device=DEVICE)
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0.0


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((4000, DIM)), rng.standard_normal((4000, DIM))
    result = metrics.kid(x, y, num_subsets=400, max_subset_size=10, seed=1)
    # Mean 0 within 4 standard errors; the biased (diagonal-including) estimate is ~ +1.3.
    assert abs(result.mean) < 4 * result.std / np.sqrt(400)
    shifted = metrics.kid(x, y + 1.0, num_subsets=400, max_subset_size=10, seed=1)
    assert shifted.mean > 10 * shifted.std / np.sqrt(400)


def test_reference_stats_are_cached_by_content_and_n(env, net_file, tmp_path, monkeypatch):
    calls = []
    real = metrics._run_network
    monkeypatch.setattr(metrics, "_run_network", lambda m, b: calls.append(len(b)) or real(m, b))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    npz = tmp_path / "ref.npz"
    np.savez(npz, images=images)

    first = metrics.reference_stats(npz, batch_size=8)
    assert sum(calls) == 20 and len(list((env / "fid-refs").glob("*.npz"))) == 1
    own = own_features(net_file, torch.from_numpy(images).double() / 127.5 - 1)
    np.testing.assert_allclose(first.mu, own.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first.sigma, np.cov(own, rowvar=False), rtol=1e-5, atol=1e-7)

    again = metrics.reference_stats(npz, batch_size=8)
    assert sum(calls) == 20  # a cache hit: nothing extracted
    assert np.array_equal(again.mu, first.mu) and np.array_equal(again.features, first.features)

    metrics.reference_stats(npz, n=10)  # another n: another entry
    assert sum(calls) == 30
    images[3, 0, 2, 5] ^= 1  # one pixel changed (file name, shape, size unchanged)
    np.savez(npz, images=images)
    changed = metrics.reference_stats(npz)
    assert sum(calls) == 50 and not np.array_equal(changed.mu, first.mu)
    assert len(list((env / "fid-refs").glob("*.npz"))) == 3


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.ENV_PATH, raising=False)
    monkeypatch.delenv(inception.ENV_SHA256, raising=False)
    return tmp_path / "cache" / inception.FILE_NAME


def test_missing_weights_say_where_to_put_them(no_weights, monkeypatch, capsys):
    with pytest.raises(WeightsUnavailable) as info:
        inception.load_network()
    for word in (str(no_weights), "--inception", inception.ENV_PATH, inception.URL):
        assert word in str(info.value)

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the weights were checked")

    monkeypatch.setattr(metrics, "sample_features", no_sampling)
    assert main(["eval", "runs/none", "--fid", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff: error: inception:")
    assert str(no_weights) in err[0]


def test_download_is_kept_only_with_the_expected_sha256(no_weights, net_file, monkeypatch):
    monkeypatch.setattr(inception, "URL", net_file.as_uri())
    good = hashlib.sha256(net_file.read_bytes()).hexdigest()
    monkeypatch.setenv(inception.ENV_SHA256, hashlib.sha256(b"another file").hexdigest())
    with pytest.raises(WeightsUnavailable, match=f"SHA-256 {good}"):
        inception.load_network()
    assert not no_weights.exists() and not list(no_weights.parent.glob("*"))

    monkeypatch.setenv(inception.ENV_SHA256, good)
    network = inception.load_network()
    assert network.path == no_weights and network.sha256 == good
    assert no_weights.read_bytes() == net_file.read_bytes()
    assert inception.load_network().path == no_weights  # now read from the cache
    no_weights.write_bytes(b"damaged")
    with pytest.raises(WeightsUnavailable, match="expected SHA-256"):
        inception.load_network()


def test_unreachable_url_is_a_one_line_error(no_weights, tmp_path):
    with pytest.raises(WeightsUnavailable, match="cannot download"):
        inception.fetch((tmp_path / "absent.pt").as_uri(), no_weights, "0" * 64)


def test_bad_input_names_the_argument(env):
    with pytest.raises(ValueError, match="images"):
        metrics.fid(torch.zeros(4, 2, 8, 8), torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="num_subsets"):
        metrics.kid(np.zeros((4, 2)), np.zeros((4, 2)), num_subsets=0)
    with pytest.raises(ValueError, match="b: expected"):
        metrics.fid(np.zeros((4, 2)), np.zeros((4,)))
    with pytest.raises(TypeError, match="network"):
        metrics.extract_features(torch.zeros(2, 1, 8, 8), network=3)


def _tf32_settings():
    """What torch says now about TF32 for convolutions and matmuls (either API)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


class _PrecisionSpy(torch.nn.Module):
    """A feature network that records the TF32 settings while it runs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x, return_features: bool = False):
        self.seen.append(_tf32_settings())
        return torch.zeros(x.shape[0], 4)


def test_features_are_extracted_in_ieee_fp32_not_tf32(tmp_path):
    """cuDNN convolutions may use TF32 by default (a 10-bit mantissa on Ampere and later),
    which shifts the features and FID; extraction runs in IEEE fp32 and restores the
    settings after."""
    spy = _PrecisionSpy()
    before = _tf32_settings()
    metrics.extract_features(torch.zeros(5, 1, 8, 8), FeatureNetwork(spy, "x", tmp_path),
                             batch_size=2)  # fmt: skip
    assert spy.seen in ([("ieee", "ieee")] * 3, [(False, False)] * 3), spy.seen
    assert _tf32_settings() == before


def test_a_network_on_another_device_than_asked_is_refused(tmp_path):
    net = FeatureNetwork(_PrecisionSpy(), "x", tmp_path)
    with pytest.raises(ValueError, match="device: meta but the network's weights are on cpu"):
        metrics.extract_features(torch.zeros(2, 1, 8, 8), net, device="meta")
