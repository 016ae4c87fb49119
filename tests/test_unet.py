"""Tests for fastdiff.unet: shapes, memory formats, precision, gradients, config, errors."""

import json

import pytest
import torch

from fastdiff.unet import PRESETS, UNet, count_parameters, timestep_embedding


def perturbed(model: UNet, seed: int = 0, scale: float = 0.05) -> UNet:
    """Add noise to every parameter: the zero-initialised convs would otherwise make the output
    identically zero and every comparison below trivially true."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model.eval()


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet.preset("tiny", **overrides))


def inputs(model: UNet, batch: int, size: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size = size or model.config["image_size"]
    z = torch.randn(batch, model.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return z, t


CONFIGS = {
    "tiny": {},
    "rgb-in-2-out": dict(in_channels=3, out_channels=2),
    "three-levels-two-heads": dict(
        channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4), num_heads=2
    ),
    "no-attention-levels": dict(attention_resolutions=()),
    "scale-shift": dict(scale_shift_norm=True),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(overrides, batch):
    model = tiny(**overrides)
    z, t = inputs(model, batch)
    out = model(z, t)
    assert out.shape == (batch, model.out_channels, 8, 8)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_other_spatial_size_than_image_size():
    model = tiny()
    z, t = inputs(model, 2, size=12)
    assert model(z, t).shape == (2, 1, 12, 12)


def test_untrained_model_predicts_zero():
    # The DDPM initialisation: the final conv is zero, so g(z, t) = 0 before training.
    model = UNet.preset("tiny")
    z, t = inputs(model, 2)
    assert torch.count_nonzero(model(z, t)) == 0


@pytest.mark.parametrize("num_heads", [1, 2])
def test_channels_last_matches_contiguous(num_heads):
    model = tiny(num_heads=num_heads)
    z, t = inputs(model, 3)
    ref = model(z, t)
    z_cl = z.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(z_cl, t), ref, atol=1e-5, rtol=1e-5)
    model = model.to(memory_format=torch.channels_last)
    out = model(z_cl, t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Multi-channel output, to check the memory format actually propagates.
    rgb = tiny(in_channels=3, num_heads=num_heads).to(memory_format=torch.channels_last)
    z3, t3 = inputs(rgb, 2)
    out3 = rgb(z3.to(memory_format=torch.channels_last), t3)
    assert out3.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out3, rgb(z3, t3), atol=1e-5, rtol=1e-5)


def test_autocast_bf16_close_to_fp32():
    model = tiny()
    z, t = inputs(model, 3)
    ref = model(z, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(z, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max()
    assert err <= 0.05 * ref.abs().max() + 1e-3, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    model = tiny()
    z, t = inputs(model, 2)
    ref = model(z, t)
    out = model.to(dtype)(z.to(dtype), t)
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max()
    assert err <= 0.05 * ref.abs().max() + 1e-3, err


@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_gradients_reach_every_parameter(scale_shift_norm):
    model = tiny(
        channel_mult=(1, 2, 2), attention_resolutions=(8, 4), scale_shift_norm=scale_shift_norm
    ).train()
    z, t = inputs(model, 3)
    loss = (model(z, t) - torch.randn_like(z)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_at_initialisation_reach_final_conv():
    model = UNet.preset("tiny")
    z, t = inputs(model, 2)
    model(z, t).sub(z).square().mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_int_and_float_timesteps_agree():
    model = tiny()
    z, t = inputs(model, 3)
    torch.testing.assert_close(model(z, t), model(z, t.float()), atol=0, rtol=0)
    torch.testing.assert_close(model(z, t.int()), model(z, t), atol=0, rtol=0)


def test_scalar_timestep_broadcasts():
    model = tiny()
    z, _ = inputs(model, 3)
    ref = model(z, torch.full((3,), 7))
    torch.testing.assert_close(model(z, torch.tensor(7)), ref, atol=0, rtol=0)
    torch.testing.assert_close(model(z, 7), ref, atol=0, rtol=0)


def test_output_depends_on_timestep():
    model = tiny()
    z, _ = inputs(model, 2)
    assert not torch.allclose(model(z, torch.tensor([0, 0])), model(z, torch.tensor([500, 500])))


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    torch.testing.assert_close(emb[1, 0], torch.sin(torch.tensor(1.0)))
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


def test_timestep_embedding_conventions():
    t = torch.tensor([0, 3, 999])
    default = timestep_embedding(t, 16)
    flipped = timestep_embedding(t, 16, flip_sin_to_cos=True)
    torch.testing.assert_close(
        flipped, torch.cat([default[:, 8:], default[:, :8]], dim=1), rtol=0, atol=0
    )
    shifted = timestep_embedding(t, 16, freq_shift=0)  # f_i = 10000^(-i / 8)
    torch.testing.assert_close(shifted[1, 7], torch.sin(3 * torch.tensor(10000.0) ** (-7 / 8)))
    torch.testing.assert_close(default[1, 7], torch.sin(torch.tensor(3 / 10000.0)))


def test_convention_options():
    model = UNet.preset("tiny", norm_eps=1e-6, downsample_padding=0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    down = model.down[0].downsample
    x = torch.randn(2, 16, 8, 8)
    # padding 0: one zero column/row on the right/bottom only (TensorFlow "SAME", stride 2).
    want = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2
    )
    torch.testing.assert_close(down(x), want, rtol=0, atol=0)
    assert UNet(**model.config).config == model.config


def test_cifar10_parameter_count_and_config_round_trip():
    with torch.device("meta"):
        model = UNet.preset("cifar10")
        # Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model.
        assert count_parameters(model) == 35_746_307
        assert abs(count_parameters(model) - 35.7e6) < 0.1e6
        rebuilt = UNet(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    with torch.device("meta"):
        model = UNet.preset(name)
        rebuilt = UNet(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    assert count_parameters(rebuilt) == count_parameters(model)


def test_digits_preset_is_small():
    with torch.device("meta"):
        model = UNet.preset("digits")
    assert model.in_channels == model.out_channels == 1
    assert model.config["image_size"] == 16
    assert 1e6 <= count_parameters(model) <= 2e6


def test_preset_overrides_and_unknown_name():
    model = UNet.preset("tiny", in_channels=3)
    assert model.config["in_channels"] == 3 and model.config["out_channels"] == 3
    with pytest.raises(ValueError, match="known presets: .*cifar10.*digits.*tiny"):
        UNet.preset("imagenet")


def test_wrong_channel_count_raises():
    model = UNet.preset("tiny")
    with pytest.raises(ValueError, match=r"z has 3 channels .* expects 1"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "z, t, match",
    [
        (torch.randn(1, 8, 8), torch.tensor([0]), "z must be a 4-d tensor"),
        (torch.randn(2, 1, 7, 7), torch.tensor([0, 1]), "z's height and width"),
        (torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2]), "t must have shape"),
        (torch.randn(2, 1, 8, 8), torch.zeros(2, 1), "t must have shape"),
    ],
)
def test_bad_forward_inputs_raise(z, t, match):
    with pytest.raises(ValueError, match=match):
        UNet.preset("tiny")(z, t)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=-1), "out_channels"),
        (dict(base_channels=18), "num_groups"),
        (dict(num_groups=5), "num_groups"),
        (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention_resolutions=(5,)), "attention_resolutions"),
        (dict(num_heads=3), "num_heads"),
        (dict(in_channels=1.5), "in_channels"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(downsample_padding=2), "downsample_padding"),
        (dict(flip_sin_to_cos=1), "flip_sin_to_cos"),
        (dict(freq_shift=2), "freq_shift"),
        (dict(scale_shift_norm=1), "scale_shift_norm"),
    ],
)
def test_bad_constructor_args_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet.preset("tiny", **overrides)


def test_scale_shift_block_is_the_modulated_group_norm():
    """A scale-shift ResBlock: temb_proj gives 2 c_out values per sample, the first half the
    scale and the second the shift of norm2, written out here with F.group_norm."""
    from torch.nn import functional as F

    from fastdiff.unet import ResBlock

    torch.manual_seed(0)
    block = perturbed(ResBlock(4, 8, 16, 0.0, 2, scale_shift=True))
    assert block.temb_proj.out_features == 16
    x, temb = torch.randn(3, 4, 5, 5), torch.randn(3, 16)
    h = block.conv1(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias)))
    e = F.linear(F.silu(temb), block.temb_proj.weight, block.temb_proj.bias)
    scale, shift = e[:, :8, None, None], e[:, 8:, None, None]
    h = F.group_norm(h, 2, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    want = block.skip(x) + block.conv2(F.silu(h))
    torch.testing.assert_close(block(x, temb), want, rtol=1e-5, atol=1e-6)


def test_scale_shift_survives_a_checkpoint(tmp_path):
    """config.json records scale_shift_norm and load() rebuilds the modulated blocks."""
    from fastdiff import Diffusion, NoiseSchedule, load

    model = tiny(scale_shift_norm=True, num_classes=3)
    Diffusion(model, NoiseSchedule.linear(20), (1, 8, 8)).save(tmp_path / "run")
    back = load(tmp_path / "run", device="cpu").model
    assert back.config["scale_shift_norm"] is True
    z, t = inputs(model, 2)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(back(z, t, y), model(z, t, y), rtol=0, atol=0)
