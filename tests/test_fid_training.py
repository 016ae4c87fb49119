"""FID during training (``fid_every``) and ``fastdiff eval --fid``, with the stand-in network.

The logged FID is recomputed here from the saved EMA weights: fastdiff.sample with the FID
sampler and seed, features from calling the network here, the first ``fid_samples`` training
images as the reference, scipy's sqrtm.  Tolerance 1e-6 relative: the run samples through its
own EMA module and the check through the loaded one, so the float32 samples (and features) may
differ in the last bits; FID is float64 from there.  The raw weights' FID differs by > 1e-3.
Runs on the torch reference backend (the kernels are not what is tested; it is faster).
"""

import json

import numpy as np
import pytest
import torch
from helpers import FAKE_INCEPTION_DIM as DIM
from helpers import own_features, save_fake_inception, scipy_fid

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff import inception, metrics
from fastdiff.cli import main
from fastdiff.inception import WeightsUnavailable

N_FID = 6
# lr and ema_decay large enough for the EMA weights to differ visibly from the raw ones.
TINY = dict(preset="tiny", T=2, batch_size=4, lr=0.05, warmup_steps=0, ema_decay=0.5,
            device="cpu", progress=False, log_every=1, n_samples=2, sample_sampler="ddim",
            sample_steps=2)  # fmt: skip


@pytest.fixture
def env(monkeypatch, tmp_path):
    net = save_fake_inception(tmp_path / "fake-inception.pt")
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(inception.ENV_PATH, str(net))
    return net


def fid_records(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "fid" in r]


def test_fid_every_logs_the_ema_models_fid_and_the_best_step(
    env, npz, tmp_path, capsys, reference_backend
):
    out = tmp_path / "run"
    fastdiff.train(str(npz), steps=2, fid_every=1, fid_samples=N_FID, out_dir=out, **TINY)
    records = fid_records(out)
    assert [r["step"] for r in records] == [1, 2]
    best = min(records, key=lambda r: r["fid"])
    assert records[-1]["best_fid"] == best["fid"] and records[-1]["best_fid_step"] == best["step"]
    saved = ckpt.read_config(out / "checkpoints" / "step_00000002")
    assert saved["fid_best"] == {"fid": best["fid"], "step": best["step"]}

    # Step 2's FID, recomputed from the saved EMA weights (and not the raw ones).
    d = fastdiff.load(out)
    images = np.load(npz)["images"][:N_FID]
    ref = own_features(env, torch.from_numpy(images).double() / 127.5 - 1)

    name, steps = metrics.default_sampler(d.schedule.T)  # what fid_every samples with

    def fid_of(use_ema):
        x = fastdiff.sample(d, N_FID, sampler=name, steps=steps, seed=0, use_ema=use_ema)
        return scipy_fid(own_features(env, x), ref)

    ema, raw = fid_of(True), fid_of(False)
    assert records[-1]["fid"] == pytest.approx(ema, rel=1e-6)
    assert records[-1]["fid"] != pytest.approx(raw, rel=1e-3)

    # fastdiff eval --fid: the run's data as the reference, the same sampler and seed.
    args = ["eval", str(out), "--fid", "--kid", "-n", str(N_FID), "--no-progress"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fid"] == pytest.approx(records[-1]["fid"], rel=1e-6)
    assert result["kid"] == pytest.approx(records[-1]["kid"], rel=1e-6)
    assert (result["n"], result["ref_n"], result["sampler"], result["steps"]) == (6, 6, name, steps)
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"FID {result['fid']:.4f} (6 samples, {name} {steps} steps")
    assert lines[1].startswith(f"KID {result['kid']:.6f} +- ")


def test_fid_settings_are_checked_before_training(monkeypatch, tmp_path):
    x = torch.zeros(8, 1, 8, 8)
    for bad in (dict(fid_every=-1), dict(fid_every=1.5), dict(fid_samples=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fastdiff.train(x, steps=1, **bad, **TINY)
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.ENV_PATH, raising=False)
    monkeypatch.delenv(inception.ENV_SHA256, raising=False)
    with pytest.raises(WeightsUnavailable, match="FASTDIFF_INCEPTION"):
        fastdiff.train(x, steps=1, fid_every=1, out_dir=tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()  # nothing started


def test_eval_fid_reduces_each_sampling_batch_to_features_before_drawing_the_next(
    env, monkeypatch, reference_backend
):
    """n = 300 > the sampling batch (256): the FID is that of fastdiff.sample's 300 images,
    and the network sees each batch's images before the next batch's first model call (so
    only one batch is ever held).  The precision is passed on and named in the result."""
    from fastdiff import Diffusion, NoiseSchedule, UNet

    d = Diffusion(UNet.preset("tiny"), NoiseSchedule.linear(4), (1, 8, 8))
    with torch.no_grad():  # the output conv starts at zero: eps = 0 whatever the precision
        for p in d.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    ref = np.random.default_rng(0).standard_normal((50, DIM))
    n, sampler = 300, ("ddim", 2)
    events = []
    d.model.register_forward_hook(lambda *_: events.append("model"))
    extract = metrics.extract_features

    def spy(images, *args, **kwargs):
        events.append(("features", images.shape[0]))
        return extract(images, *args, **kwargs)

    monkeypatch.setattr(metrics, "extract_features", spy)
    result = metrics.evaluate(d, ref=metrics.FeatureStats.of(ref), n=n, sampler=sampler,
                              precision="fp32", use_ema=False)  # fmt: skip
    assert events == ["model"] * 2 + [("features", 256)] + ["model"] * 2 + [("features", 44)]
    x = fastdiff.sample(d, n, sampler="ddim", steps=2, seed=0, precision="fp32")
    assert result["fid"] == pytest.approx(scipy_fid(own_features(env, x), ref), rel=1e-9)
    assert result["precision"] == "fp32"
    bf16 = metrics.evaluate(d, ref=metrics.FeatureStats.of(ref), n=n, sampler=sampler,
                            precision="bf16")  # fmt: skip
    assert bf16["precision"] == "bf16" and bf16["fid"] != result["fid"]


def test_sample_batches_are_writable_and_a_failed_consumer_ends_the_sampling(
    env, monkeypatch, reference_backend
):
    """iter_samples yields normal tensors (not inference tensors, which refuse in-place
    writes outside inference mode); when feature extraction fails, sampling ends at once:
    the model is back in training mode without waiting for the traceback to go."""
    from fastdiff import Diffusion, NoiseSchedule, UNet
    from fastdiff.diffusion import iter_samples

    d = Diffusion(UNet.preset("tiny").train(), NoiseSchedule.linear(4), (1, 8, 8))
    batch = next(iter(iter_samples(d, 2, sampler="ddim", steps=2, seed=0)))
    assert not batch.is_inference()
    batch.add_(1.0)  # raises for an inference tensor
    d.model.train()

    def broken(*args, **kwargs):
        raise RuntimeError("network failed")

    monkeypatch.setattr(metrics, "extract_features", broken)
    with pytest.raises(RuntimeError, match="network failed") as info:
        metrics.sample_features(d, 300, save_fake_inception(env.parent / "n.pt"), ("ddim", 2))
    assert d.model.training and info.value is not None  # the traceback is still alive here
