"""Class-conditional training and classifier-free guidance end to end.

Training: label dropout to the null class at its rate (binomial bound), inside the captured
step (its generator registered with the graph: strict capture, replays == eager bitwise),
exact resume.  Sampling: s = 1 is the conditional model alone, s = 0 the unconditional one,
any s the guided eps u + s (c - u) of a model written here; one model call on 2B rows per
step, captured as one graph.  The UNet's class embedding, the checkpoint round trip, the
CLI.
"""

import functools
import math

import pytest
import torch
from test_train_graph import max_diff
from test_training import tiny_data
from torch import nn

import fastdiff
from fastdiff import Diffusion, NoiseSchedule, UNet, low_precision
from fastdiff.cli import main
from fastdiff.errors import CheckpointError
from fastdiff.labels import drop_labels
from fastdiff.precision import resolve_precision
from fastdiff.samplers import Guidance, SamplerRunner, SamplerSpec
from fastdiff.unet import PRESETS, count_parameters

K = 3
TINY = dict(preset="tiny", T=20, device="cpu", progress=False, warmup_steps=2,
            precision="fp32", channels_last=False)  # fmt: skip
FP32 = resolve_precision("fp32", torch.device("cpu"))
#: The smallest grid a run with out_dir writes: one image per class, 2 DDIM steps.
GRID = dict(n_samples=K, sample_sampler="ddim", sample_steps=2)


def labelled(n=8):
    return tiny_data(n=n), torch.arange(n) % K


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_is_within_its_binomial_bound(p):
    y = torch.arange(20000) % K
    got = drop_labels(y, p, K, torch.Generator().manual_seed(1))
    dropped = got == K
    assert binomial_ok(int(dropped.sum()), y.numel(), p)
    assert torch.equal(got[~dropped], y[~dropped])  # the others keep their label


class Recorder(nn.Module):
    """A user model with forward(z, t, y) and num_classes: records the labels it is given."""

    def __init__(self):
        super().__init__()
        self.num_classes = K
        self.inner = UNet.preset("tiny", num_classes=K)
        self.seen = []

    def forward(self, z, t, y):
        self.seen.append(y.clone())
        return self.inner(z, t, y)


def test_training_drops_labels_at_the_class_dropout_rate():
    x, y = labelled(8)
    model = Recorder()
    fastdiff.train(x, model, conditional=True, labels=y, class_dropout=0.5, steps=4,
                   batch_size=24, **{k: v for k, v in TINY.items() if k != "preset"})  # fmt: skip
    seen = torch.cat(model.seen)
    assert seen.numel() == 4 * 24 and seen.max() <= K
    assert binomial_ok(int((seen == K).sum()), seen.numel(), 0.5)
    kept = seen[seen != K].reshape(-1)
    assert set(kept.tolist()) <= set(range(K))


def test_conditional_resume_is_exact(tmp_path):
    x, y = labelled(6)
    # class_dropout fixed (not the default): with these seeds every class and the null class
    # are drawn, so every embedding row must move
    kw = dict(conditional=True, labels=y, class_dropout=0.1, batch_size=2, log_every=2,
              checkpoint_every=3, lr=1e-3, **TINY, **GRID)  # fmt: skip
    straight = fastdiff.train(x, steps=6, out_dir=tmp_path / "a", **kw)
    fastdiff.train(x, steps=3, out_dir=tmp_path / "b", **kw)
    resumed = fastdiff.train(x, steps=6, out_dir=tmp_path / "b", resume=True, **kw)
    assert max_diff(straight.model, resumed.model) == 0
    assert max_diff(straight.ema_model, resumed.ema_model) == 0
    # the null class and the labels both trained: rows of the class embedding moved
    assert resumed.model.class_embed.weight.abs().sum(1).gt(0).all()
    loaded = fastdiff.load(tmp_path / "b", device="cpu")
    assert loaded.num_classes == K and loaded.model.config["num_classes"] == K


def test_resume_checks_class_dropout_only_for_conditional_runs(tmp_path):
    """A conditional run resumes only with its own class dropout (clear error otherwise); an
    unconditional run, whose config records the unused default, resumes with any."""
    x, y = labelled(6)
    kw = dict(batch_size=2, log_every=2, checkpoint_every=2, **TINY)
    fastdiff.train(x, steps=2, out_dir=tmp_path / "u", class_dropout=0.1, **kw)
    fastdiff.train(x, steps=4, out_dir=tmp_path / "u", resume=True, class_dropout=0.5, **kw)
    kw.update(conditional=True, labels=y, **GRID)
    fastdiff.train(x, steps=2, out_dir=tmp_path / "c", class_dropout=0.1, **kw)
    with pytest.raises(CheckpointError, match=r"class_dropout=0\.1.*class_dropout=0\.5"):
        fastdiff.train(x, steps=4, out_dir=tmp_path / "c", resume=True, class_dropout=0.5, **kw)


@pytest.mark.parametrize(
    "preset,differs",
    [
        ("digits", r"scale_shift_norm=False \(this run: True\)"),
        ("digits_wide", r"channel_mult=\[1, 2, 4\] \(this run: \[1, 2, 2\]\)"),
    ],
)
def test_resume_names_the_preset_of_a_run_started_with_another_model(tmp_path, preset, differs):
    """A conditional 16x16 run started with an earlier default (the 1.1M ``digits`` preset,
    then the wider ``digits_wide``) resumed without a preset: the error names what differs
    and the preset that rebuilds it, before any weights load; with that preset it resumes."""
    x, y = tiny_data(n=4, size=16), torch.arange(4) % K
    kw = dict(batch_size=2, conditional=True, labels=y, **GRID,
              **{k: v for k, v in TINY.items() if k != "preset"})  # fmt: skip
    fastdiff.train(x, steps=1, preset=preset, out_dir=tmp_path, **kw)
    with pytest.raises(
        CheckpointError, match=differs + rf".*preset='{preset}' \(--preset {preset}\)"
    ):
        fastdiff.train(x, steps=2, resume=True, out_dir=tmp_path, **kw)
    d = fastdiff.train(x, steps=2, resume=True, preset=preset, out_dir=tmp_path, **kw)
    assert d.model.config["channel_mult"] == list(PRESETS[preset]["channel_mult"])
    assert d.model.config["scale_shift_norm"] is False


def test_captured_conditional_step_equals_the_eager_one(emulated_cuda, monkeypatch):
    """Strict: the label generator must be registered with the graph (an unregistered one
    fails the capture), and 3 warm-up steps + capture + 2 replays == 5 eager steps."""
    monkeypatch.setenv("FASTDIFF_STRICT", "1")
    x, y = labelled(6)
    kw = dict(conditional=True, labels=y, class_dropout=0.5, steps=5, batch_size=2, **TINY)
    replayed = fastdiff.train(x, **kw)
    assert emulated_cuda.train_captures == 1 and emulated_cuda.replays >= 2
    emulated_cuda.disable()
    eager = fastdiff.train(x, **kw)
    assert max_diff(replayed.model, eager.model) == 0
    assert max_diff(replayed.ema_model, eager.ema_model) == 0


# -- sampling -------------------------------------------------------------------------------


def conditional_diffusion(seed=0, T=20):
    """A tiny conditional UNet with random weights (class rows far apart)."""
    torch.manual_seed(seed)
    model = UNet.preset("tiny", num_classes=K)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        model.class_embed.weight.normal_(0.0, 3.0)
    return Diffusion(model.eval(), NoiseSchedule.linear(T), (1, 8, 8))


class Fixed(nn.Module):
    """An unconditional model made from the conditional one, in plain torch: eps at labels y
    (s = None), or the guided u + s (c - u) in float64 from two separate calls."""

    def __init__(self, model, y, s=None):
        super().__init__()
        self.model, self.y, self.s = model, y, s

    def forward(self, z, t):
        c = self.model(z, t, self.y)
        if self.s is None:
            return c
        u = self.model(z, t).double()
        return (u + self.s * (c.double() - u)).float()


def _sample(d, sampler="ddim", **kw):
    return fastdiff.sample(d, 4, seed=3, sampler=sampler, steps=4, precision="fp32",
                           channels_last=False, **kw)  # fmt: skip


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(sampler):
    d = conditional_diffusion()
    _sample = functools.partial(globals()["_sample"], sampler=sampler)
    y = torch.tensor([0, 1, 2, 1])
    null = torch.full((4,), K)
    plain = lambda net: Diffusion(net, d.schedule, d.image_shape)  # noqa: E731
    cond = _sample(d, labels=y, guidance_scale=1.0)
    assert torch.equal(cond, _sample(plain(Fixed(d.model, y))))  # the same B-row calls
    uncond = _sample(d, labels=y, guidance_scale=0.0)
    want = _sample(plain(Fixed(d.model, null)))
    # the 2B-row call may round differently from a B-row one (oneDNN blocking): fp32 level
    torch.testing.assert_close(uncond, want, rtol=0, atol=1e-5)
    assert (cond - uncond).abs().max() > 0.01  # the labels matter (1000x the tolerance)
    assert torch.equal(_sample(d), _sample(plain(Fixed(d.model, null))))  # labels=None: null
    guided = _sample(d, labels=y, guidance_scale=3.0)
    torch.testing.assert_close(guided, _sample(plain(Fixed(d.model, y, 3.0))), rtol=0, atol=1e-4)


class CallCounter(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.batches = model, K, []

    def forward(self, z, t, y):
        self.batches.append((z.shape[0], y.clone()))
        return self.model(z, t, y)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm++2m"])
def test_guided_step_is_one_captured_graph_with_one_2b_model_call(emulated_cuda, kind):
    """Every sampler: the guided step (one model call on 2B rows, the fused update forming the
    guided eps) is captured once and replayed; replays equal the eager chain bit for bit."""
    d = conditional_diffusion(T=4)
    counter = CallCounter(d.model)
    spec = SamplerSpec(kind, None if kind == "ddpm" else 2, clip_x0=False, variance="beta")
    sampler = SamplerRunner(counter, d.schedule, spec, precision=FP32, channels_last=False,
                            guidance=Guidance(K, 3.0))  # fmt: skip
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 0])
    with torch.inference_mode():
        eager = sampler.run_eager(sampler.buffers(z0.clone(), 7, y)).clone()
        counter.batches.clear()
        graph = sampler.run_graph(z0, 7, labels=y, strict=True)
        again = sampler.run_graph(z0, 7, labels=torch.tensor([1, 1]), strict=True)
    assert emulated_cuda.captures == 1 and emulated_cuda.replays == 2 * sampler.num_steps
    assert torch.equal(graph, eager) and not torch.equal(again, eager)
    # warm-up and capture (with placeholder labels, copied in before each replay): each step
    # one call on 2B rows, labels [y; null]
    assert counter.batches and all(b == 4 for b, _ in counter.batches)
    assert all(labels[2:].tolist() == [K, K] for _, labels in counter.batches)


def test_cuda_default_sampling_path_bf16_copy_channels_last_guided_is_captured(emulated_cuda):
    """What ``sample()`` runs on a GPU by default: the bf16 copy of the UNet, channels_last
    latents, the NHWC GroupNorm kernel, the guided 2B-row step, captured.  Replays equal the
    same path run eagerly bit for bit, and the images stay within bf16 rounding of the fp32
    model (the copy's weights are rounded once; ~0.01 here, bound 0.05 on values in [-1, 1]).
    dpm++2m only (the grids' and FID's sampler; the interpreter takes ~1 min per sampler);
    the other samplers' guided capture: test_guided_step_is_one_captured_graph_...."""
    d = conditional_diffusion(T=4)
    kw = dict(labels=[0, 1, 2], guidance_scale=3.0, sampler="dpm++2m", steps=2, seed=0)
    graph = fastdiff.sample(d, 3, precision="bf16", **kw)
    assert emulated_cuda.captures == 1
    bf16 = low_precision._COPIES[d.model][1]
    assert bf16.conv_in.weight.dtype == torch.bfloat16
    assert bf16.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    eager = fastdiff.sample(d, 3, precision="bf16", cuda_graph=False, **kw)
    assert emulated_cuda.captures == 1 and torch.equal(graph, eager)
    fp32 = fastdiff.sample(d, 3, precision="fp32", cuda_graph=False, **kw)
    torch.testing.assert_close(graph, fp32, rtol=0, atol=0.05)
    assert not torch.equal(graph, fp32)


@pytest.mark.parametrize(
    "model_kind, kwargs, error, match",
    [
        ("cond", dict(labels=[0, 1, 3, 0]), ValueError, r"labels: expected labels in 0..2"),
        ("cond", dict(labels=[0, 1]), ValueError, r"labels: expected one label per image"),
        ("cond", dict(labels=1, guidance_scale=float("inf")), ValueError, "guidance_scale"),
        ("cond", dict(labels=1, guidance_scale="2"), TypeError, "guidance_scale"),
        ("plain", dict(labels=1), ValueError, "labels: this model is unconditional"),
        ("plain", dict(guidance_scale=3.0), ValueError, "guidance_scale: needs a class-cond"),
    ],
)
def test_bad_sampling_arguments_are_named(model_kind, kwargs, error, match):
    if model_kind == "cond":
        d = conditional_diffusion()
    else:
        d = Diffusion(UNet.preset("tiny"), NoiseSchedule.linear(20), (1, 8, 8))
    with pytest.raises(error, match=match):
        _sample(d, **kwargs)


def test_cli_conditional_train_sample_and_eval(tmp_path, capsys):
    import numpy as np

    x, y = labelled(6)
    npz = tmp_path / "d.npz"
    np.savez(npz, images=x.numpy(), labels=y.numpy())
    run = tmp_path / "run"
    args = ["train", "--data", str(npz), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--preset", "tiny", "--T", "10", "--conditional", "--class-dropout", "0.2",
            "--n-samples", "6", "--sample-steps", "2", "--no-progress", "--precision", "fp32",
            "--channels-last", "off"]  # fmt: skip
    assert main(args) == 0
    assert fastdiff.load(run, device="cpu").num_classes == K
    out = tmp_path / "g.npz"
    args = ["sample", str(run), "--label", "all", "-n", "6", "--sampler", "ddim", "--steps",
            "2", "--guidance-scale", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert np.load(out)["images"].shape == (6, 1, 8, 8)  # one row of 2 per class
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(npz), "-n", "2", "--no-progress"]) == 0
    assert "conditional on the data's labels" in capsys.readouterr().out
    assert main(["sample", str(run), "--label", "5", "--out", str(out), "--no-progress"]) == 2


def test_conditional_elbo_uses_the_labels():
    """bits_per_dim(labels=y) is the bound of the model at y (Fixed, written here), and
    differs from the null class's."""
    from fastdiff.elbo import bits_per_dim

    d = conditional_diffusion(T=4)
    x, y = labelled(4)
    got = bits_per_dim(d, x, labels=y, batch_size=4)
    want = bits_per_dim(Diffusion(Fixed(d.model, y), d.schedule, d.image_shape), x, batch_size=4)
    assert got["conditional"] and not want["conditional"]
    assert got["bits_per_dim"] == pytest.approx(want["bits_per_dim"], rel=1e-6)
    assert abs(bits_per_dim(d, x, batch_size=4)["bits_per_dim"] - got["bits_per_dim"]) > 1e-3


def test_conditional_digits_get_the_scale_shift_preset():
    """1x16x16 data: a conditional run gets ``digits_conditional`` (the ``digits`` shape with
    scale-shift conditioning: its null class scores closest to the unconditional runs,
    docs/PERFORMANCE.md), an unconditional one ``digits``; a preset the user names wins
    either way."""
    from fastdiff.training import model_for_data

    with torch.device("meta"):
        conditional = model_for_data((1, 16, 16), num_classes=10)
        unconditional = model_for_data((1, 16, 16))
        named = model_for_data((1, 16, 16), "digits", num_classes=10)
    assert conditional.config["channel_mult"] == [1, 2, 2]
    assert conditional.config["scale_shift_norm"] is True
    assert conditional.num_classes == 10
    assert count_parameters(conditional) == 1_192_641
    assert unconditional.config["scale_shift_norm"] is False
    assert unconditional.num_classes is None
    assert named.config["scale_shift_norm"] is False
    assert named.num_classes == 10
