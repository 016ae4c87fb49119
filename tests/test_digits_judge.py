"""tools/digits_judge.py: the Frechet distance, and a judge that tells digits from noise."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "digits_judge", Path(__file__).parents[1] / "tools" / "digits_judge.py"
)
judge = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(judge)


def test_frechet_distance_closed_form():
    """For N(m1, s1^2 I) and N(m2, s2^2 I) in d dims: |m1 - m2|^2 + d (s1 - s2)^2."""
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    a = rng.standard_normal((n, d))
    b = 0.5 + 2.0 * rng.standard_normal((n, d))
    want = d * 0.5**2 + d * (1.0 - 2.0) ** 2
    assert judge.frechet_distance(a, b) == pytest.approx(want, rel=0.02)
    assert abs(judge.frechet_distance(a, a)) < 1e-8
    # A non-diagonal case: the same correlated cloud, shifted, is at distance |shift|^2.
    mix = rng.standard_normal((d, d))
    assert judge.frechet_distance(a @ mix, a @ mix + 3.0) == pytest.approx(9.0 * d, rel=1e-6)


def test_frechet_mean_term_is_the_squared_distance_of_the_means():
    """N(0, I) against N(0.5, 4 I) in d dims: mean term d * 0.5^2 (exact for the sample means),
    the rest d * (1 - 2)^2; a shifted copy of a cloud differs by its mean term alone."""
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    a = rng.standard_normal((n, d))
    b = 0.5 + 2.0 * rng.standard_normal((n, d))
    terms = judge.frechet_terms(a, b)
    assert terms["fd_mean"] == pytest.approx(((a.mean(0) - b.mean(0)) ** 2).sum(), rel=1e-12)
    assert terms["fd_mean"] == pytest.approx(d * 0.5**2, rel=0.02)
    assert terms["fd"] - terms["fd_mean"] == pytest.approx(d * (1.0 - 2.0) ** 2, rel=0.02)
    shifted = judge.frechet_terms(a, a + np.arange(d))
    assert shifted["fd_mean"] == pytest.approx(float((np.arange(d) ** 2).sum()), rel=1e-9)
    assert shifted["fd"] == pytest.approx(shifted["fd_mean"], abs=1e-8)


@pytest.mark.slow
def test_real_digits_score_far_lower_than_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    net = judge.train_judge()
    assert list(tmp_path.glob("digits_judge-*.pt"))  # cached for the next call
    assert judge.held_out_accuracy(net) > 0.95
    scores = judge.reference_scores(net)
    real, noise = scores["real"], scores["noise"]
    assert real["n"] == noise["n"] == judge.SPLIT[2]
    assert real["fd"] < noise["fd"] / 20
    assert real["confidence"] > 0.9 > noise["confidence"]
    assert min(real["histogram"]) > 0 and sum(real["histogram"]) == real["n"]
    # The training images themselves, as uint8 (the .npz path), score like held-out digits.
    train_images = judge.split_digits()["train"][0][:200]
    as_uint8 = ((train_images + 1) * 127.5).round().to(torch.uint8)
    np.savez(tmp_path / "train.npz", images=as_uint8.numpy())
    again = judge.judge_images(judge.load_npz_images(tmp_path / "train.npz"), net)
    assert again["fd"] == pytest.approx(judge.judge_images(train_images, net)["fd"], rel=1e-6)
    assert math.isfinite(again["fd"]) and again["fd"] < noise["fd"] / 20
    # Cached weights give the same judge.
    assert judge.judge_images(train_images, judge.train_judge())["fd"] == pytest.approx(
        judge.judge_images(train_images, net)["fd"]
    )


def test_bad_image_shape():
    with pytest.raises(ValueError, match="images"):
        judge.judge_images(torch.zeros(4, 3, 16, 16), net=judge.JudgeNet())


def test_eval_loss_of_an_untrained_unet_is_the_noise_power(tmp_path):
    """A fresh UNet predicts eps = 0 (zero-initialised output layer), so its eval loss is
    E[eps^2] = 1 over the 1797 x 4 x 256 fixed draws (std of the mean ~0.001)."""
    from fastdiff import Diffusion, NoiseSchedule
    from fastdiff.training import model_for_data

    torch.manual_seed(0)
    model = model_for_data((1, 16, 16), "tiny")
    Diffusion(model, NoiseSchedule.linear(100), (1, 16, 16)).save(tmp_path / "ckpt")
    loss = judge.eval_loss(tmp_path / "ckpt", draws=1)
    assert loss == pytest.approx(1.0, abs=0.01)
    assert judge.eval_loss(tmp_path / "ckpt", draws=1) == loss  # fixed draws: deterministic


def test_eval_losses_labelled_feeds_each_digit_its_own_label():
    """A conditional model whose class rows all equal its null row predicts the same for every
    label, so labelled == unlabelled losses; moving class 3's row then changes exactly the
    losses of the digits labelled 3.  An unconditional model refuses ``labelled``."""
    from fastdiff import Diffusion, NoiseSchedule, UNet

    tiny16 = dict(image_size=16, attention_resolutions=(8,))
    torch.manual_seed(0)
    model = UNet.preset("tiny", **tiny16, num_classes=10)
    for p in model.parameters():  # no zero-initialised layer: the prediction depends on y
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        model.class_embed.weight[:] = model.class_embed.weight[10]
    d = Diffusion(model, NoiseSchedule.linear(100), (1, 16, 16))
    null, t = judge.eval_losses(d, draws=1)
    assert t.shape == null.shape == (1797,) and int(t.max()) < 100
    assert torch.equal(judge.eval_losses(d, draws=1, labelled=True)[0], null)
    with torch.no_grad():
        model.class_embed.weight[3] += 1.0
    moved = judge.eval_losses(d, draws=1, labelled=True)[0] != null
    assert torch.equal(moved, judge.load_digits()[1] == 3)
    unconditional = Diffusion(UNet.preset("tiny", **tiny16), NoiseSchedule.linear(100), (1, 16, 16))
    with pytest.raises(ValueError, match="labelled: this checkpoint is unconditional"):
        judge.eval_losses(unconditional, draws=1, labelled=True)
