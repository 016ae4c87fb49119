"""The bf16 sampling copy of a UNet (fastdiff.low_precision): cast once, cached, refreshed
from the source's weights at every call, never the user's module.  The copy is only made for
CUDA; ``device`` is just compared, so the caching logic runs here on CPU modules."""

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import UNet, low_precision
from fastdiff.low_precision import sampling_model
from fastdiff.precision import resolve_precision

CUDA = torch.device("cuda")
BF16 = resolve_precision("bf16", torch.device("cpu"))


def test_bf16_copy_is_cached_and_leaves_the_model_alone():
    model = UNet.preset("tiny").train()
    copy = sampling_model(model, BF16, CUDA, channels_last=True)
    assert copy is not model and not copy.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    assert copy.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.training
    assert model.conv_in.weight.is_contiguous()
    assert sampling_model(model, BF16, CUDA, channels_last=True) is copy
    assert sampling_model(model, BF16, CUDA, channels_last=False) is not copy


def test_copy_follows_in_place_weight_updates():
    """An EMA step (in place): the next call returns the same copy with the new weights."""
    model = UNet.preset("tiny")
    ema = fastdiff.ema.EMA(model, decay=0.5)
    first = sampling_model(ema.shadow, BF16, CUDA, channels_last=True)
    with torch.no_grad():
        model.conv_in.bias.add_(1.0)
    ema.update(step=100)
    second = sampling_model(ema.shadow, BF16, CUDA, channels_last=True)
    assert second is first
    torch.testing.assert_close(
        second.conv_in.bias.float(), ema.shadow.conv_in.bias, rtol=2**-8, atol=0
    )


def test_copy_follows_writes_that_bump_no_version_counter():
    """``p.data`` writes (and collectives, raw-pointer writers) leave ``_version`` alone; the
    copy still samples the current weights (once it was cached by version: stale)."""
    model = UNet.preset("tiny")
    sampling_model(model, BF16, CUDA, channels_last=True)
    version = model.conv_in.bias._version
    model.conv_in.bias.data.add_(1.0)
    model.conv_in.weight.data.mul_(-3.0)
    assert model.conv_in.bias._version == version
    copy = sampling_model(model, BF16, CUDA, channels_last=True)
    assert torch.equal(copy.conv_in.bias, model.conv_in.bias.to(torch.bfloat16))
    assert torch.equal(copy.conv_in.weight, model.conv_in.weight.to(torch.bfloat16))
    assert copy.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_changed_structure_drops_the_old_copy_before_casting_the_new(monkeypatch):
    """Another layout (or device, shape): a new copy, and the old one is freed before it is
    cast, so two copies never share the GPU's memory."""
    import weakref

    model = UNet.preset("tiny")
    old = weakref.ref(sampling_model(model, BF16, CUDA, channels_last=True))
    cast, freed = low_precision._cast_copy, []
    monkeypatch.setattr(
        low_precision, "_cast_copy", lambda *a: freed.append(old() is None) or cast(*a)
    )
    new = sampling_model(model, BF16, CUDA, channels_last=False)
    assert freed == [True] and new.conv_in.weight.is_contiguous()


def test_a_model_made_under_inference_mode_samples_its_current_weights():
    """Inference tensors: the copy is made and refreshed there and outside alike, and an
    in-place update made under inference mode is never sampled stale."""
    with torch.inference_mode():
        model = UNet.preset("tiny")
        first = sampling_model(model, BF16, CUDA, channels_last=False)
        model.conv_in.bias.add_(1.0)
    second = sampling_model(model, BF16, CUDA, channels_last=False)
    assert torch.equal(second.conv_in.bias, model.conv_in.bias.to(torch.bfloat16))
    assert second is first


@pytest.mark.parametrize("capability,want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                             ((9, 0), "bf16")])  # fmt: skip
def test_auto_precision_on_cuda_takes_bf16_only_where_it_is_native(monkeypatch, capability, want):
    asked = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    device = torch.device("cuda", 1)
    assert resolve_precision("auto", device).name == want and asked == [device]


@pytest.mark.parametrize(
    "model,precision,device",
    [
        (UNet.preset("tiny"), "fp32", CUDA),
        (UNet.preset("tiny"), "fp16", CUDA),
        (UNet.preset("tiny"), "bf16", torch.device("cpu")),
        (nn.Conv2d(1, 1, 3), "bf16", CUDA),  # not a fastdiff UNet: autocast only, as before
    ],
)
def test_other_cases_sample_the_model_itself(model, precision, device):
    prec = resolve_precision(precision, torch.device("cpu"))
    assert sampling_model(model, prec, device, channels_last=True) is model


def test_bf16_copy_predicts_what_autocast_predicts():
    """Weights rounded to bf16 once vs autocast's per-call casts: the same network."""
    torch.manual_seed(0)
    model = UNet.preset("tiny").eval()
    for p in model.parameters():  # move the zero-initialised layers off zero
        p.data.add_(0.05 * torch.randn_like(p))
    copy = sampling_model(model, BF16, CUDA, channels_last=True)
    z = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([5, 900])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(z, t).float(), copy(z, t).float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * float(want.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 copy is made on CUDA only")
def test_cuda_bf16_sampling_uses_the_copy_and_keeps_the_model():
    model = UNet.preset("tiny").cuda()
    d = fastdiff.Diffusion(model, fastdiff.NoiseSchedule.linear(20), (1, 8, 8))
    images = d.sample(4, seed=0, precision="bf16")
    assert images.shape == (4, 1, 8, 8) and bool(images.isfinite().all())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(images, d.sample(4, seed=0, precision="bf16"))
