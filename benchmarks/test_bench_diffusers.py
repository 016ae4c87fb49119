"""A diffusers DDPMPipeline sampled by fastdiff against diffusers' own loop.

Run: ``pytest benchmarks/test_bench_diffusers.py --benchmark-only`` (needs diffusers:
``pip install "fastdiff[diffusers]"``; skipped without it).

The pipeline: google/ddpm-cifar10-32's UNet2DModel configuration (35.7M parameters; random
weights, since nothing is downloaded) with a linear DDPMScheduler of T = 20 steps, written with
diffusers' ``save_pretrained`` and loaded back by each side.  One call = 20 denoising steps on a
batch of n images; s/step = median / 20.

* ``fastdiff_graph``: ``fastdiff.load(pipeline_dir)`` (the UNet converted to fastdiff's UNet),
  ``run_sampler`` with ``cuda_graph=True``: one step captured as a CUDA graph (in the warm-up
  rounds) and replayed 20 times, fused reverse step, channels_last; with bf16 it runs what
  ``sample()`` runs, the bf16 copy of the weights (fastdiff.low_precision, refreshed inside
  the timed call), where diffusers autocasts its fp32 weights.
* ``fastdiff_eager`` (CPU): the same step function run eagerly.
* ``diffusers``: the body of ``DDPMPipeline.__call__``: ``randn_tensor``, then per timestep
  ``unet(image, t).sample`` and ``scheduler.step(...).prev_sample`` (the pipeline's progress bar
  and final numpy conversion left out).  fp32 is what DDPMPipeline runs by default; bf16 runs
  the same loop under ``torch.autocast`` (the precision fastdiff picks on such GPUs).

CPU case (so the file cannot rot; skipped numbers are not the point): a 0.7M-parameter
UNet2DModel of the same family on 3x16x16, n = 4.  CUDA cases (skipped without CUDA): n = 16
and 256, fastdiff bf16 and fp32, diffusers fp32 and bf16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff import load  # noqa: E402
from fastdiff.low_precision import sampling_model  # noqa: E402
from fastdiff.precision import memory_format, resolve_precision  # noqa: E402
from fastdiff.sampling import Sampler, run_sampler  # noqa: E402

NO_CUDA_REASON = "CUDA is not available: the CUDA diffusers-pipeline cases need a GPU"
T = 20
SEED = 0

#: google/ddpm-cifar10-32's unet/config.json (as in tests/test_diffusers.py).
CIFAR10_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
)
SMALL_UNET = dict(
    CIFAR10_UNET,
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    model: str  # "cifar10" or "small"
    n: int
    impl: str  # fastdiff_graph / fastdiff_eager / diffusers
    precision: str  # fp32 / bf16
    rounds: int
    warmup_rounds: int

    @property
    def id(self) -> str:
        return f"{self.device}-{self.model}-n{self.n}-{self.precision}-{self.impl}"

    def attrs(self) -> dict:
        return {"impl": self.impl, "precision": self.precision}


CASES = [
    Case("cpu", "small", 4, "fastdiff_eager", "fp32", 3, 1),
    Case("cpu", "small", 4, "diffusers", "fp32", 3, 1),
    *(
        Case("cuda", "cifar10", n, impl, prec, 10, 2)
        for n in (16, 256)
        for impl, prec in [
            ("fastdiff_graph", "bf16"),
            ("fastdiff_graph", "fp32"),
            ("diffusers", "fp32"),
            ("diffusers", "bf16"),
        ]
    ),
]


def _params():
    out = []
    for c in CASES:
        marks = []
        if c.device == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """``pipeline_dir(model)``: a DDPMPipeline directory, written once per model."""
    cache = {}

    def get(model: str):
        if model not in cache:
            torch.manual_seed(SEED)
            unet = diffusers.UNet2DModel(**(CIFAR10_UNET if model == "cifar10" else SMALL_UNET))
            sched = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
            path = tmp_path_factory.mktemp(model) / "pipeline"
            diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
            cache[model] = path
        return cache[model]

    return get


def _fastdiff(case: Case, path, dev):
    diffusion = load(path, device=dev)
    prec = resolve_precision(case.precision, dev)
    cl = dev.type == "cuda"
    model = diffusion.model.to(memory_format=memory_format(cl)).eval().requires_grad_(False)
    copy = sampling_model(model, prec, dev, cl)  # what sample() runs: bf16 copy on CUDA
    sampler = Sampler(copy, diffusion.schedule, precision=prec, channels_last=cl,
                      variance=diffusion.sampling_default("variance", "beta"))  # fmt: skip
    graph = case.impl == "fastdiff_graph"

    def fn():
        sampling_model(model, prec, dev, cl)  # the per-call refresh
        return run_sampler(sampler, case.n, diffusion.image_shape, dev, seed=SEED,
                           batch_size=case.n, cuda_graph=graph)  # fmt: skip

    return fn


def _diffusers(case: Case, path, dev):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(path), local_files_only=True).to(dev)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    size = unet.config.sample_size
    shape = (case.n, unet.config.in_channels, size, size)
    autocast = torch.autocast(dev.type, torch.bfloat16, enabled=case.precision == "bf16")

    def fn():
        generator = torch.Generator(device=dev).manual_seed(SEED)
        with torch.inference_mode(), autocast:
            image = randn_tensor(shape, generator=generator, device=dev)
            scheduler.set_timesteps(T)
            for t in scheduler.timesteps:
                model_output = unet(image, t).sample
                image = scheduler.step(model_output, t, image, generator=generator).prev_sample
        return image.float().clamp(-1, 1)

    return fn


@pytest.mark.parametrize("case", _params())
def test_sample_pipeline(measure_rounds, pipeline_dir, case):
    dev = torch.device(case.device)
    if dev.type == "cuda" and case.precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device does not support bf16")
    path = pipeline_dir(case.model)
    fn = (_diffusers if case.impl == "diffusers" else _fastdiff)(case, path, dev)
    images = measure_rounds(
        fn,
        group=f"diffusers pipeline {case.device} {case.model} n={case.n} T={T}",
        side=f"{case.precision}-{case.impl}",
        device=case.device,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        derive=lambda median: {"s_per_step": median / T},
        attrs=case.attrs(),
        what="sample_pipeline",
        n=case.n,
        steps=T,
    )
    assert images.shape[0] == case.n and torch.isfinite(images).all()
