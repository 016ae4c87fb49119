"""diffusers interop: DDPMPipeline / UNet2DModel directories in (fastdiff.load), pipelines out
(Diffusion.save(format="diffusers"), fastdiff export), checked against diffusers itself.

Tolerances: fp32 throughout.  Predictions of a converted UNet vs diffusers' UNet2DModel on the
same (z, t): atol = rtol = 1e-5 (the same convolutions in the same order; observed ~1e-7).
20 reverse steps, each side on its own trajectory with the same explicit noise: atol = rtol =
1e-4 (observed: up to 2.5e-5 with the linear schedule, 2.9e-4 on values of about 5 with
scaled_linear).  The gap opens at the last few steps: diffusers evaluates
1 - alpha_bar_t / alpha_bar_{t-1} and its x0-form coefficients in float32, which cancel where
alpha_bar is close to 1; fastdiff's tables are float64, cast once.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff import Diffusion, NoiseSchedule, UNet, load, ops  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.diffusers_convert import (  # noqa: E402
    schedule_from_scheduler_config,
    scheduler_config_for,
)
from fastdiff.diffusers_io import DiffusersUNet  # noqa: E402

STEPS = 20
SIZE = 16
#: google/ddpm-cifar10-32's conventions, at toy size.
DDPM_STYLE = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=8,
)
#: UNet2DModel's own defaults (cos before sin, frequency shift 0, symmetric downsampling
#: padding, eps 1e-5), with 8 heads of width 8 at the 64-channel attention.
DIFFUSERS_STYLE = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_eps=1e-5,
    norm_num_groups=16,
)


def make_unet(style=DDPM_STYLE, **overrides):
    """A tiny UNet2DModel with random weights; GroupNorm affines perturbed too, so a swapped
    or dropped norm parameter would show."""
    torch.manual_seed(0)
    cfg = dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64))
    unet = diffusers.UNet2DModel(**cfg, layers_per_block=1, **{**style, **overrides})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet.eval()


def save_pipeline(path, unet, **scheduler):
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=STEPS, **{"clip_sample": False, **scheduler}
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return path


def inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 7, 500, 999][:batch])  # the embedding at t up to 999 as well
    return z, t


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast as two on an idle machine, and does not
    stall (OpenMP waits) when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    unet = make_unet()
    path = save_pipeline(tmp_path_factory.mktemp("ddpm") / "pipe", unet)
    return path, unet


def run_cli(capsys, *argv):
    """main(argv) and the lines it wrote to stderr."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("style", [DDPM_STYLE, DIFFUSERS_STYLE], ids=["ddpm", "defaults"])
def test_converted_eps_prediction_equals_diffusers(tmp_path, style):
    unet = make_unet(style)
    diffusion = load(save_pipeline(tmp_path / "pipe", unet), device="cpu")
    net = diffusion.model
    assert isinstance(net, UNet) and diffusion.config["diffusers"]["unet"] == "converted"
    eps = unet.config.norm_eps
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == eps for m in norms)
    assert net.config["num_heads"] == (1 if style is DDPM_STYLE else 8)
    z, t = inputs()
    with torch.no_grad():
        want = unet(z, t).sample
        got = net(z, t)
        got_cl = net(z.contiguous(memory_format=torch.channels_last), t)
    assert want.abs().mean() > 0.1  # a prediction worth comparing
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_cl, want, atol=1e-5, rtol=1e-5)
    assert diffusion.image_shape == (3, SIZE, SIZE) and diffusion.schedule.T == STEPS
    assert diffusion.ema_model is None


@pytest.mark.parametrize(
    "scheduler, variance, clip",
    [
        (dict(variance_type="fixed_small"), "posterior", False),
        (dict(variance_type="fixed_large"), "beta", False),
        (dict(variance_type="fixed_small", clip_sample=True), "posterior", True),
        (dict(variance_type="fixed_large", beta_schedule="scaled_linear"), "beta", False),
    ],
    ids=["fixed_small", "fixed_large", "fixed_small-clip", "fixed_large-scaled_linear"],
)
def test_twenty_reverse_steps_equal_ddpm_scheduler_loop(tmp_path, pipeline, scheduler, variance,
                                                        clip):  # fmt: skip
    _, unet = pipeline
    path = save_pipeline(tmp_path / "pipe", unet, **scheduler)
    diffusion = load(path, device="cpu")
    assert diffusion.config["sampling"] == {"variance": variance, "clip_x0": clip}
    sched = diffusers.DDPMScheduler.from_pretrained(str(path / "scheduler"))
    sched.set_timesteps(STEPS)
    assert sched.timesteps.tolist() == list(range(STEPS - 1, -1, -1))
    z_ref = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    z = z_ref.clone()
    with torch.no_grad():
        for i in sched.timesteps.tolist():
            t = torch.full((2,), i)
            # diffusers draws its step noise with randn(shape, generator); the same seeded
            # generator gives fastdiff the identical explicit noise.
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(100 + i))
            gen = torch.Generator().manual_seed(100 + i)
            z_ref = sched.step(unet(z_ref, t).sample, i, z_ref, generator=gen).prev_sample
            pred = diffusion.model(z, t)
            z = ops.reverse_step(z, pred, t, diffusion.schedule, noise=noise, variance=variance,
                                 clip_x0=clip)  # fmt: skip
    assert z_ref.abs().max() > 0.5
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)


def test_sampling_uses_the_recorded_scheduler_defaults(pipeline):
    path, _ = pipeline  # variance_type fixed_small, clip_sample False
    diffusion = load(path, device="cpu")
    images = diffusion.sample(2, seed=5)
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()
    torch.testing.assert_close(images, diffusion.sample(2, seed=5, variance="posterior"))
    assert not torch.equal(images, diffusion.sample(2, seed=5, variance="beta"))


def fastdiff_diffusion(seed=0, **overrides) -> Diffusion:
    """A fastdiff UNet with random weights and different EMA weights, linear T=20 schedule."""
    torch.manual_seed(seed)
    cfg = dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), dropout=0.0, image_size=SIZE, num_groups=8)  # fmt: skip
    model = UNet(**{**cfg, **overrides})
    ema = UNet(**{**cfg, **overrides})
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters(), strict=True):
            p.normal_(0.0, 0.1)
            q.copy_(p + 0.05 * torch.randn_like(p))
    return Diffusion(model, NoiseSchedule.linear(STEPS), (3, SIZE, SIZE), ema_model=ema)


def test_export_loads_in_diffusers_and_round_trips(tmp_path, capsys):
    diffusion = fastdiff_diffusion()
    out = diffusion.save(tmp_path / "pipe", format="diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    z, t = inputs()
    with torch.no_grad():
        want = diffusion.ema_model(z, t)  # EMA weights by default
        torch.testing.assert_close(pipe.unet(z, t).sample, want, atol=1e-5, rtol=1e-5)
        back = load(out, device="cpu")
        torch.testing.assert_close(back.model(z, t), want, atol=1e-5, rtol=1e-5)
    s = pipe.scheduler.config
    assert (s.beta_schedule, s.variance_type, s.clip_sample) == ("linear", "fixed_large", False)
    np.testing.assert_allclose(pipe.scheduler.betas.numpy(), diffusion.schedule.betas.numpy(),
                               rtol=1e-6)  # fmt: skip
    assert back.config["sampling"] == {"variance": "beta", "clip_x0": False}
    # The target must be new or empty: nothing is overwritten.
    code, err = run_cli(capsys, "export", str(out), str(out))
    assert code == 2 and len(err) == 1 and "not empty" in err[0]


def test_cli_export_of_a_checkpoint_ema_and_raw(tmp_path, capsys):
    diffusion = fastdiff_diffusion(seed=1)
    ckpt = diffusion.save(tmp_path / "ckpt")
    z, t = inputs()
    for flag, net in (([], diffusion.ema_model), (["--no-ema"], diffusion.model)):
        out = tmp_path / f"pipe{len(flag)}"
        assert main(["export", str(ckpt), str(out), "--format", "diffusers", *flag]) == 0
        unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet"), local_files_only=True)
        with torch.no_grad():
            torch.testing.assert_close(unet(z, t).sample, net(z, t), atol=1e-5, rtol=1e-5)
    assert "DDPMPipeline with the raw weights" in capsys.readouterr().out


def test_schedules_round_trip_through_scheduler_configs():
    for schedule, kind in [
        (NoiseSchedule.linear(50, 1e-3, 0.03), "linear"),
        (NoiseSchedule.cosine(50), "squaredcos_cap_v2"),
        (NoiseSchedule(np.linspace(1e-3, 0.2, 50) ** 1.5), None),
    ]:
        cfg = scheduler_config_for(schedule, variance="posterior")
        assert cfg["beta_schedule" if kind else "trained_betas"] == (
            kind or pytest.approx(schedule.betas.tolist())
        )
        theirs = diffusers.DDPMScheduler.from_config(cfg)
        np.testing.assert_allclose(theirs.betas.numpy(), schedule.betas.numpy(), rtol=1e-5)
        ours, sampling = schedule_from_scheduler_config(dict(theirs.config))
        np.testing.assert_allclose(ours.betas.numpy(), schedule.betas.numpy(), rtol=1e-12)
        assert sampling == {"variance": "posterior", "clip_x0": False}
    scaled = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours, _ = schedule_from_scheduler_config(scaled)
    theirs = diffusers.DDPMScheduler(**scaled)
    np.testing.assert_allclose(ours.betas.numpy(), theirs.betas.numpy(), rtol=1e-5)


def test_non_ddpm_unet_is_wrapped_and_sampled_with_the_fused_step(tmp_path, capsys):
    # scale_shift without attn_norm_num_groups: no GroupNorm in the middle attention.
    unet = make_unet(resnet_time_scale_shift="scale_shift")  # not expressible by fastdiff
    path = save_pipeline(tmp_path / "pipe", unet)
    diffusion = load(path, device="cpu")
    assert isinstance(diffusion.model, DiffusersUNet)
    assert diffusion.config["diffusers"]["unet"] == "wrapped"
    assert "resnet_time_scale_shift" in diffusion.config["diffusers"]["reason"]
    z, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(diffusion.model(z, t), unet(z, t).sample, atol=0, rtol=0)
    png = tmp_path / "grid.png"
    assert main(["sample", str(path), "-n", "2", "--out", str(png), "--no-progress"]) == 0
    assert png.is_file()
    # A wrapped UNet2DModel exports as it is, and a fastdiff checkpoint of it loads back.
    out = diffusion.save(tmp_path / "again", format="diffusers")
    again = diffusers.UNet2DModel.from_pretrained(str(out / "unet"), local_files_only=True)
    ckpt = load(diffusion.save(tmp_path / "ckpt"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(z, t).sample, unet(z, t).sample, atol=0, rtol=0)
        torch.testing.assert_close(ckpt.model(z, t), unet(z, t).sample, atol=0, rtol=0)


@pytest.mark.parametrize(
    "scheduler, field",
    [
        (dict(prediction_type="v_prediction"), "prediction_type='v_prediction'"),
        (dict(variance_type="learned_range"), "variance_type='learned_range'"),
        (dict(thresholding=True), "thresholding=True"),
    ],
)
def test_unsupported_scheduler_settings_give_one_line(tmp_path, pipeline, capsys, scheduler,
                                                      field):  # fmt: skip
    path = save_pipeline(tmp_path / "pipe", pipeline[1], **scheduler)
    code, err = run_cli(capsys, "sample", str(path), "-n", "1", "--out", str(tmp_path / "x.png"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("fastdiff: error: diffusers scheduler: ") and field in err[0]
    assert not (tmp_path / "x.png").exists()


def test_directories_that_are_not_ddpm_give_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    ldm = tmp_path / "ldm"
    ldm.mkdir()
    index = {
        "_class_name": "LDMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vqvae": ["diffusers", "VQModel"],
    }
    (ldm / "model_index.json").write_text(json.dumps(index))
    lone = tmp_path / "lone"  # a UNet2DModel folder with no scheduler config anywhere
    make_unet().save_pretrained(str(lone))
    for path, words in [
        (empty, "no checkpoint found"),
        (vae, "holds a AutoencoderKL"),
        (ldm, "'vqvae'"),
        (lone, "no scheduler config"),
    ]:
        code, err = run_cli(capsys, "eval", str(path), "-n", "1", "--no-progress")
        assert code == 2 and len(err) == 1 and words in err[0], (path, err)


def test_unet_folder_with_a_given_or_sibling_scheduler(tmp_path, pipeline):
    path, unet = pipeline
    z, t = inputs()
    beside = load(path / "unet", device="cpu")  # ../scheduler of a pipeline's unet/ folder
    lone = tmp_path / "lone"
    unet.save_pretrained(str(lone))
    given = load(lone, scheduler=path / "scheduler", device="cpu")
    with torch.no_grad():
        want = unet(z, t).sample
        for d in (beside, given):
            torch.testing.assert_close(d.model(z, t), want, atol=1e-5, rtol=1e-5)


def test_import_and_conversion_never_import_diffusers(pipeline, tmp_path):
    path, _ = pipeline
    code = (
        "import sys, fastdiff\n"
        "assert 'diffusers' not in sys.modules\n"
        f"d = fastdiff.load({str(path)!r}, device='cpu')\n"
        f"d.save({str(tmp_path / 'out')!r}, format='diffusers')\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
        "print(type(d.model).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "UNet"


#: google/ddpm-cifar10-32's unet/config.json (the published values; the keys it omits take
#: UNet2DModel's defaults).
CIFAR10_UNET = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def test_ddpm_cifar10_config_converts_to_the_cifar10_preset():
    from fastdiff.diffusers_convert import unet_config_from_diffusers
    from fastdiff.unet import count_parameters

    conventions = dict(norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    fields = {k: v for k, v in CIFAR10_UNET.items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = UNet(**unet_config_from_diffusers(CIFAR10_UNET))
        preset = UNet.preset("cifar10", dropout=0.0, **conventions)
        theirs = diffusers.UNet2DModel(**fields)
    assert ours.config == preset.config
    assert count_parameters(ours) == count_parameters(theirs) == 35_746_307


def test_legacy_attention_names_convert_like_current_ones(pipeline):
    from fastdiff.diffusers_convert import state_dict_from_diffusers, unet_config_from_diffusers

    _, unet = pipeline
    cfg = unet_config_from_diffusers(dict(unet.config))
    state = unet.state_dict()
    legacy = {}
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert legacy.keys() != state.keys()
    want = state_dict_from_diffusers(state, cfg)
    got = state_dict_from_diffusers(legacy, cfg)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fine_tuning_converted_weights_with_train(pipeline, tmp_path):
    from fastdiff import train

    loaded = load(pipeline[0], device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    data = torch.rand(8, 3, SIZE, SIZE) * 2 - 1
    tuned = train(data, model=loaded.model, schedule=loaded.schedule, steps=2, batch_size=4,
                  warmup_steps=1, device="cpu", progress=False)  # fmt: skip
    assert isinstance(tuned.model, UNet) and tuned.schedule.T == STEPS
    assert any(not torch.equal(before[k], v) for k, v in tuned.model.state_dict().items())
    out = tuned.save(tmp_path / "tuned", format="diffusers")
    assert load(out, device="cpu").model.config == tuned.model.config


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dpm_solver_sampling_of_a_pipeline_equals_diffusers(pipeline, channels_last):
    """A loaded DDPMPipeline sampled with dpm++2m from given latents equals the same UNet
    under DPMSolverMultistepScheduler.from_config(the pipeline's scheduler), as a diffusers
    user switches schedulers: 10 steps, fp32, within 1e-4 (clamped to [-1, 1] like sample()).
    The saved DDPMScheduler config carries its own timestep_spacing ("leading"), which
    from_config would inherit; fastdiff follows DPMSolverMultistepScheduler's default,
    "linspace", so that is what is compared."""
    path, unet = pipeline
    diffusion = load(path, device="cpu")
    ddpm_config = diffusers.DDPMScheduler.from_pretrained(str(path / "scheduler")).config
    sched = diffusers.DPMSolverMultistepScheduler.from_config(
        ddpm_config, timestep_spacing="linspace"
    )
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    sched.set_timesteps(10)
    z_T = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    z = z_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t).sample, t, z).prev_sample
    got = diffusion.sample(2, sampler="dpm++2m", steps=10, latents=z_T, precision="fp32",
                           channels_last=channels_last)  # fmt: skip
    assert z.abs().max() > 0.5
    torch.testing.assert_close(got, z.clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_class_conditional_unet2dmodel_converts_with_equal_predictions(tmp_path):
    """num_class_embeds=4 -> fastdiff UNet(num_classes=3) (the last embedding: the null class);
    same predictions as diffusers for every label, the null class (y=None) included."""
    unet = make_unet(num_class_embeds=4)
    diffusion = load(save_pipeline(tmp_path / "pipe", unet), device="cpu")
    net = diffusion.model
    assert isinstance(net, UNet) and diffusion.num_classes == 3
    z, t = inputs()
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        want = unet(z, t, class_labels=y).sample
        got = net(z, t, y)
        null = unet(z, t, class_labels=torch.full((4,), 3)).sample
        got_null = net(z, t)
    assert (want - null).abs().mean() > 0.01  # the labels change the prediction
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_null, null, atol=1e-5, rtol=1e-5)


def test_conditional_export_round_trips_through_unet2dmodel(tmp_path):
    diffusion = fastdiff_diffusion(num_classes=5)
    out = diffusion.save(tmp_path / "pipe", format="diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.num_class_embeds == 6
    z, t = inputs()
    y = torch.tensor([0, 4, 5, 2])  # 5: the null class
    with torch.no_grad():
        want = diffusion.ema_model(z, t, y)
        torch.testing.assert_close(pipe.unet(z, t, class_labels=y).sample, want, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
        back = load(out, device="cpu")
        assert back.num_classes == 5
        torch.testing.assert_close(back.model(z, t, y), want, atol=1e-5, rtol=1e-5)


def test_scale_shift_unet2dmodel_converts_with_equal_predictions(tmp_path):
    """resnet_time_scale_shift="scale_shift" (with the middle attention's GroupNorm named by
    attn_norm_num_groups) -> UNet(scale_shift_norm=True): diffusers' own ResnetBlock2D is the
    independent reference for silu(GroupNorm(h) (1 + scale) + shift), conditional too."""
    unet = make_unet(
        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, num_class_embeds=4
    )
    diffusion = load(save_pipeline(tmp_path / "pipe", unet), device="cpu")
    net = diffusion.model
    assert isinstance(net, UNet) and net.config["scale_shift_norm"] is True
    z, t = inputs()
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        want = unet(z, t, class_labels=y).sample
        got = net(z, t, y)
        got_cl = net(z.contiguous(memory_format=torch.channels_last), t, y)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_cl, want, atol=1e-5, rtol=1e-5)


def test_scale_shift_export_round_trips_through_unet2dmodel(tmp_path):
    diffusion = fastdiff_diffusion(num_classes=3, scale_shift_norm=True)
    out = diffusion.save(tmp_path / "pipe", format="diffusers")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    cfg = pipe.unet.config
    assert (cfg.resnet_time_scale_shift, cfg.attn_norm_num_groups) == ("scale_shift", 8)
    z, t = inputs()
    y = torch.tensor([0, 3, 1, 2])  # 3: the null class
    with torch.no_grad():
        want = diffusion.ema_model(z, t, y)
        got = pipe.unet(z, t, class_labels=y).sample
        back = load(out, device="cpu")
        assert back.model.config["scale_shift_norm"] is True
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back.model(z, t, y), want, atol=1e-5, rtol=1e-5)
