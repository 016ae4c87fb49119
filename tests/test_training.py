"""train(): the loss goes down, resume is exact, checkpoints are atomic, bad input is refused."""

import contextlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff import training
from fastdiff.errors import CheckpointError, DataError
from fastdiff.training import NonFiniteLossError

TINY = dict(preset="tiny", T=50, device="cpu", progress=False, warmup_steps=2)


def tiny_data(n=32, channels=1, size=8, seed=0):
    """Blobs at a few positions: simple structure a tiny model can start to learn."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(2, size - 2, (n, 2), generator=gen)
    d2 = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
    img = torch.exp(-d2.float() / 3.0) * 2 - 1
    return img[:, None].expand(n, channels, size, size).contiguous()


def test_loss_decreases():
    logs = []
    fastdiff.train(
        tiny_data(), steps=80, batch_size=16, lr=2e-3, log_every=10, on_log=logs.append, **TINY
    )
    first, last = logs[0]["loss"], min(r["loss"] for r in logs[-3:])
    assert first > 0.5  # zero-initialised output: loss starts at E[eps^2] = 1
    assert last < 0.6 * first, [r["loss"] for r in logs]
    assert [r["step"] for r in logs] == list(range(10, 81, 10))
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in logs)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_is_exact(tmp_path):
    data = tiny_data()
    kw = dict(batch_size=8, log_every=3, checkpoint_every=4, lr=1e-3, n_samples=2, **TINY)
    straight = fastdiff.train(data, steps=10, out_dir=tmp_path / "a", **kw)
    fastdiff.train(data, steps=6, out_dir=tmp_path / "b", **kw)
    resumed = fastdiff.train(data, steps=10, out_dir=tmp_path / "b", resume=True, **kw)
    for name, module in [("model", "model"), ("ema", "ema_model")]:
        want, got = params(getattr(straight, module)), params(getattr(resumed, module))
        assert want.keys() == got.keys()
        diff = [k for k in want if not torch.equal(want[k], got[k])]
        assert not diff, f"{name} differs after resume: {diff[:5]}"
    # The metrics log continues where it stopped.
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [3, 6, 9, 10]
    assert (tmp_path / "b" / "samples.png").is_file()


def test_a_checkpoint_from_another_device_type_resumes_deterministically(
    tmp_path, monkeypatch, caplog
):
    """A CPU run resumed on CUDA (or back) brings generator states of the other kind: a CUDA
    generator's state is 16 bytes, a CPU one's 5056, and set_state refuses the other's.  The
    resume reseeds those two streams (one warning naming each) instead of failing, restores
    the rest, and stays deterministic."""
    data = tiny_data()
    kw = dict(batch_size=8, log_every=3, checkpoint_every=4, lr=1e-3, n_samples=2, **TINY)
    saved = training._Run.rank_state

    def from_a_cuda_run(self):
        state = saved(self)
        for name in ("t_generator", "label_generator"):
            state[name] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state's size
        return state

    with monkeypatch.context() as m:
        m.setattr(training._Run, "rank_state", from_a_cuda_run)
        fastdiff.train(data, steps=6, out_dir=tmp_path / "a", **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        resumed = fastdiff.train(data, steps=10, out_dir=tmp_path / "a", resume=True, **kw)
    warned = [r.getMessage() for r in caplog.records if "another device type" in r.getMessage()]
    assert len(warned) == 2 and "t_generator" in warned[0] and "label_generator" in warned[1]
    again = fastdiff.train(data, steps=10, out_dir=tmp_path / "b", resume=True, **kw)
    for name in ("model", "ema_model"):
        want, got = params(getattr(resumed, name)), params(getattr(again, name))
        assert all(torch.equal(want[k], got[k]) for k in want), name
    steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert steps == [3, 6, 9, 10]


def test_resume_keeps_the_batch_source_its_checkpoint_was_saved_by(tmp_path, monkeypatch):
    """In-memory or streamed is chosen from the device's free memory when a run starts, which
    a resume may not see again; the two draw different batches.  A run that streamed (its
    data did not fit) resumes streaming where the data would now fit, and exactly."""
    data = tiny_data()
    kw = dict(batch_size=8, log_every=3, checkpoint_every=4, lr=1e-3, n_samples=2, **TINY)
    fits = training.make_batches

    def does_not_fit(*args, **kwargs):
        return fits(*args, **{"max_device_bytes": 0, **kwargs})

    monkeypatch.setattr(training, "make_batches", does_not_fit)
    straight = fastdiff.train(data, steps=10, out_dir=tmp_path / "a", **kw)
    fastdiff.train(data, steps=6, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(training, "make_batches", fits)
    resumed = fastdiff.train(data, steps=10, out_dir=tmp_path / "b", resume=True, **kw)
    for module in ("model", "ema_model"):
        want, got = params(getattr(straight, module)), params(getattr(resumed, module))
        assert all(torch.equal(want[k], got[k]) for k in want), module


def test_resume_refuses_another_config(tmp_path):
    data = tiny_data()
    fastdiff.train(data, steps=2, batch_size=8, out_dir=tmp_path, n_samples=1, **TINY)
    with pytest.raises(CheckpointError, match="batch_size"):
        fastdiff.train(data, steps=4, batch_size=4, out_dir=tmp_path, resume=True, **TINY)
    with pytest.raises(CheckpointError, match="image"):
        fastdiff.train(
            tiny_data(size=16), steps=4, batch_size=8, out_dir=tmp_path, resume=True, **TINY
        )
    with pytest.raises(ValueError, match="resume"):
        fastdiff.train(data, steps=4, batch_size=8, resume=True, **TINY)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing step 4 leaves step 2 intact and pointed to."""
    data = tiny_data()
    fastdiff.train(data, steps=2, batch_size=8, out_dir=tmp_path, n_samples=1, **TINY)
    real_write = ckpt._write_file

    def crash_on_ema(path, data):
        if path.name == ckpt.EMA:
            raise KeyboardInterrupt("killed")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", crash_on_ema)
    with pytest.raises(KeyboardInterrupt):
        fastdiff.train(
            data, steps=4, batch_size=8, out_dir=tmp_path, resume=True, checkpoint_every=2, **TINY
        )
    found = ckpt.find_checkpoint(tmp_path)
    assert found.name == "step_00000002"
    assert found.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0700
    assert (tmp_path / "samples.png").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert fastdiff.load(tmp_path).config["step"] == 2


def test_truncated_checkpoint_is_refused(tmp_path):
    fastdiff.train(tiny_data(), steps=1, batch_size=8, out_dir=tmp_path, n_samples=1, **TINY)
    weights = ckpt.find_checkpoint(tmp_path) / ckpt.MODEL
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        fastdiff.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        fastdiff.load(tmp_path / "nothing")


def test_non_finite_loss_names_the_step():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.calls = 0

        def forward(self, z, t):
            self.calls += 1
            bad = float("nan") if self.calls == 3 else 0.0
            return z * self.w + bad

    with pytest.raises(NonFiniteLossError, match="step 3"):
        fastdiff.train(
            tiny_data(),
            Exploding(),
            steps=6,
            batch_size=4,
            T=10,
            log_every=5,
            device="cpu",
            progress=False,
        )


def test_any_module_with_forward_z_t_works(tmp_path):
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, z, t):
            return self.conv(z)

    d = fastdiff.train(
        tiny_data(),
        Linear(),
        steps=3,
        batch_size=4,
        T=10,
        device="cpu",
        progress=False,
        out_dir=tmp_path,
        n_samples=2,
    )
    assert d.sample(2, seed=0).shape == (2, 1, 8, 8)
    with pytest.raises(CheckpointError, match="model="):
        fastdiff.load(tmp_path)
    assert fastdiff.load(tmp_path, model=Linear()).sample(2, seed=0).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "data,kwargs,exc,match",
    [
        (tiny_data(channels=3), dict(model=fastdiff.UNet.preset("tiny")), DataError, "channel"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), {}, DataError, "NaN"),
        ("/no/such/folder", {}, DataError, "does not exist"),
        (tiny_data(), dict(steps=-1), ValueError, "steps"),
        (tiny_data(), dict(batch_size=0), ValueError, "batch_size"),
        (tiny_data(), dict(precision="fp8"), ValueError, "precision"),
        (tiny_data(), dict(schedule="quadratic"), ValueError, "schedule"),
        (tiny_data(), dict(lr=-1.0), ValueError, "lr"),
    ],
)
def test_bad_input(data, kwargs, exc, match):
    args = dict(steps=2, batch_size=4, T=10, device="cpu", progress=False)
    args.update(kwargs)
    model = args.pop("model", None)
    with pytest.raises(exc, match=match):
        fastdiff.train(data, model, **args)


def test_train_from_numpy_uint8_and_dataset():
    arr = ((tiny_data(n=8).numpy() + 1) * 127.5).round().astype(np.uint8)
    fastdiff.train(arr, steps=2, batch_size=4, **TINY)
    ds = torch.utils.data.TensorDataset(tiny_data(n=8), torch.zeros(8))
    d = fastdiff.train(ds, steps=2, batch_size=4, **TINY)
    assert d.image_shape == (1, 8, 8)


class _Watch:
    """What a training run's model receives, seen from hooks on the model (its input z),
    an inner conv (mid_block1.conv1: input, output and weight as the conv sees them) and the
    zero-initialised output conv's weight gradient (the only non-zero one at step 0) as
    backward delivers it, before the GradScaler unscales it."""

    INNER = "mid_block1.conv1"

    def __init__(self, model: nn.Module):
        self.z, self.inner, self.grads = [], [], []
        inner = model.get_submodule(self.INNER)

        def on_model(module, args):
            z = args[0]
            self.z.append(
                dict(dtype=z.dtype, channels_last=_is_channels_last(z),
                     contiguous=z.is_contiguous(), autocast=torch.is_autocast_enabled("cpu"),
                     autocast_dtype=torch.get_autocast_dtype("cpu"))
            )  # fmt: skip

        def on_inner(module, args, out):
            x = args[0]
            self.inner.append(
                dict(in_dtype=x.dtype, out_dtype=out.dtype, in_channels_last=_is_channels_last(x),
                     in_contiguous=x.is_contiguous(),
                     weight_channels_last=_is_channels_last(module.weight),
                     weight_contiguous=module.weight.is_contiguous())
            )  # fmt: skip

        model.register_forward_pre_hook(on_model)
        inner.register_forward_hook(on_inner)
        model.conv_out.weight.register_hook(lambda g: self.grads.append(g.detach().clone()))


def _is_channels_last(x: torch.Tensor) -> bool:
    """Laid out (n, h, w, c) and not also (n, c, h, w) (3+ channels tell them apart)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _watched_run(precision, channels_last=False, steps=3, monkeypatch=None):
    """A tiny-preset run on 3-channel 8x8 images (so the two layouts differ) with its model
    watched; returns the watch, the run's Diffusion and its GradScaler(s)."""
    from fastdiff.training import model_for_data

    scalers = []
    if monkeypatch is not None:

        class RecordingScaler(torch.amp.GradScaler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                scalers.append(self)

        monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    torch.manual_seed(0)
    model = model_for_data((3, 8, 8), "tiny")
    watch = _Watch(model)
    d = fastdiff.train(tiny_data(channels=3), model, steps=steps, batch_size=4, lr=1e-3,
                       precision=precision, channels_last=channels_last, **TINY)  # fmt: skip
    return watch, d, scalers


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_each_precision_reaches_the_model(monkeypatch, precision):
    """bf16 / fp16: the forward runs under CPU autocast to that dtype (the model's input z
    stays fp32, as q_sample makes it; the convs compute and return the autocast dtype; the
    weights stay fp32).  fp16 also scales the loss: the GradScaler is enabled, at its initial
    scale 2**16 after 3 finite steps, and the first step's weight gradient that backward
    delivers is 2**16 times the fp32 run's (same batch, t and noise).  fp32: no autocast, no
    scaling.  Every run stays finite."""
    watch, d, scalers = _watched_run(precision, monkeypatch=monkeypatch)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    assert d.config["precision"] == precision
    assert len(watch.z) == len(watch.inner) == 3
    for z in watch.z:
        assert z["dtype"] == torch.float32, z
        assert z["autocast"] is (want is not None), z
        if want is not None:
            assert z["autocast_dtype"] == want, z
    for seen in watch.inner:
        assert seen["out_dtype"] == (want or torch.float32), seen
    assert all(p.dtype == torch.float32 for p in d.model.parameters())
    assert all(torch.isfinite(p).all() for p in d.model.parameters())
    assert len(scalers) == 1
    scaler = scalers[0]
    assert scaler.is_enabled() is (precision == "fp16")
    if precision != "fp16":
        return
    assert scaler.get_scale() == 2.0**16
    fp32_watch, _, _ = _watched_run("fp32")
    scaled, plain = watch.grads[0].float(), fp32_watch.grads[0]
    assert bool(torch.isfinite(scaled).all()) and float(plain.norm()) > 0
    ratio = float(scaled.norm() / plain.norm())
    assert ratio == pytest.approx(2.0**16, rel=0.01), ratio  # measured: 0.99993 x 2**16


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_reaches_the_model(channels_last, precision):
    """channels_last=True: the model gets z laid out (n, h, w, c), its conv weights are
    channels_last and the activations stay so inside (the inner conv's input); False: all
    plain contiguous (NCHW)."""
    watch, d, _ = _watched_run(precision, channels_last=channels_last, steps=2)
    assert d.config["channels_last"] is channels_last
    assert len(watch.z) == len(watch.inner) == 2
    for z in watch.z:
        assert z["channels_last"] is channels_last and z["contiguous"] is not channels_last, z
    for seen in watch.inner:
        assert seen["in_channels_last"] is channels_last, seen
        assert seen["in_contiguous"] is not channels_last, seen
        assert seen["weight_channels_last"] is channels_last, seen
        assert seen["weight_contiguous"] is not channels_last, seen
    conv_in = d.model.conv_in.weight
    assert (
        _is_channels_last(conv_in) is channels_last and conv_in.is_contiguous() is not channels_last
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_hot_loop_does_not_synchronise(precision):
    """After warm-up, training steps make no host-device synchronisation (sync debug mode
    turns any into an error); the loss is only read back at log intervals."""
    from fastdiff.data import resolve_data
    from fastdiff.precision import resolve_precision
    from fastdiff.schedule import NoiseSchedule
    from fastdiff.training import TrainConfig, _Run, model_for_data

    dev = torch.device("cuda")
    data = resolve_data(tiny_data(n=64))
    cfg = TrainConfig(steps=100, batch_size=16, log_every=1000, precision=precision)
    model = model_for_data((1, 8, 8), "tiny").to(dev, memory_format=torch.channels_last)
    run = _Run(
        model,
        NoiseSchedule.linear(100).to(dev),
        data,
        (1, 8, 8),
        cfg,
        dev,
        resolve_precision(precision, dev),
        True,
        0,
        strict=True,
    )
    for _ in range(3):
        run.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            run.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(run.losses[:8]).all()


def test_every_phase_is_an_nvtx_range(monkeypatch, tmp_path):
    """Each training phase and each sampler step opens a named NVTX range (for Nsight)."""
    from fastdiff import profiling

    seen = []

    class Recorder:
        def annotate(self, name, domain):
            assert domain == profiling.DOMAIN
            seen.append(name)
            return contextlib.nullcontext()

    monkeypatch.setattr(profiling, "_nvtx", Recorder())
    d = fastdiff.train(tiny_data(), steps=2, batch_size=4, **TINY)
    assert set(profiling.PHASES) - {"sampler step"} <= set(seen)
    seen.clear()
    d.sample(1, seed=0)
    assert seen == ["sampler step"] * d.schedule.T


def test_sample_grids_on_a_schedule(tmp_path):
    fastdiff.train(
        tiny_data(), steps=4, batch_size=4, out_dir=tmp_path, sample_every=2, n_samples=2, **TINY
    )
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_00000002.png", "step_00000004.png"]
