"""A diffusers DDPMPipeline sampled by fastdiff against diffusers' own loop, and diffusers'
training loop as the anchor of fastdiff's training step.

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
* ``diffusers_bf16_weights``: the same loop with the UNet's weights cast to bf16
  (``unet.to(torch.bfloat16)``), bf16 latents (``randn_tensor(..., dtype=torch.bfloat16)``, as
  DDPMPipeline draws them in ``unet.dtype``) and no autocast: how the earlier diffusers anchor
  (27.3 ms/step at n = 256 on an H200) was run, beside the autocast one.

Training step (``test_train_step_diffusers``): the anchors of fastdiff's training step
(benchmarks/test_bench_train_sample.py, ``test_train_step``), at its parameters (batch 128,
linear T = 1000, AdamW lr 2e-4 with a 200-step warm-up, clipping 1.0, EMA 0.9999) on the
same random 3x32x32 data already on the device; same group name, attrs and extra_info keys
(images_per_s, ms_per_step, steps_per_call: 10 steps per timed call on CUDA, 1 on CPU), so
when both files run in one session the summary prints fastdiff's ratio to each.

* ``diffusers_example``: what diffusers' examples/unconditional_image_generation/
  train_unconditional.py does per step with ``--mixed_precision=bf16 --use_ema``: the batch
  cast to the weight dtype (bf16), ``torch.randn`` noise and ``torch.randint`` t on the
  device, ``DDPMScheduler(num_train_timesteps=1000).add_noise``, ``UNet2DModel`` (the
  google/ddpm-cifar10-32 configuration, fp32 weights) under ``torch.autocast`` bf16,
  ``F.mse_loss(pred.float(), noise.float())``, backward, ``clip_grad_norm_(params, 1.0)``,
  ``AdamW`` (not fused), the lr scheduler's step, ``zero_grad(set_to_none=True)``,
  ``EMAModel(decay=0.9999, use_ema_warmup=True, power=3/4).step`` (a per-parameter loop).
  The example's per-step ``loss.item()`` logging is left out: it would synchronise every
  step, where fastdiff's loop keeps the loss on the device.
* ``diffusers_tuned``: the same with the model and its input channels_last, ``AdamW(fused=True)``
  on CUDA and ``EMAModel(..., foreach=True)``: what a user who tunes that loop gets.

CPU cases (so the file cannot rot; skipped numbers are not the point): a 0.7M-parameter
UNet2DModel of the same family on 3x16x16, n = 4 (sampling) and batch 4 (training).  CUDA
cases (skipped without CUDA): sampling n = 16 and 256, fastdiff bf16 and fp32, diffusers
fp32, bf16 (autocast) and bf16 weights; training batch 128, example and tuned.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_bench_train_sample import assert_graph_replayed  # noqa: E402

from fastdiff import load  # noqa: E402
from fastdiff.low_precision import sampling_model  # noqa: E402
from fastdiff.precision import memory_format, resolve_precision  # noqa: E402
from fastdiff.sampling import Sampler, run_sampler  # noqa: E402

NO_CUDA_REASON = "CUDA is not available: the CUDA diffusers cases need a GPU"
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


#: CUDA: 6 timed calls of 20 steps after 2 warm-up calls (the graph's capture, cuDNN's and
#: Triton's first calls): a call is 0.05-2 s on an H200 and the spread between calls of a
#: graph replay or a fixed eager loop is small, so 6 give a stable median.  n = 256 first
#: (the anchor's batch), so that a run cut at its time limit has those rows.
CASES = [
    Case("cpu", "small", 4, "fastdiff_eager", "fp32", 3, 1),
    Case("cpu", "small", 4, "diffusers", "fp32", 3, 1),
    Case("cpu", "small", 4, "diffusers_bf16_weights", "bf16", 3, 1),
    *(
        Case("cuda", "cifar10", n, impl, prec, 6, 2)
        for n in (256, 16)
        for impl, prec in [
            ("fastdiff_graph", "bf16"),
            ("fastdiff_graph", "fp32"),
            ("diffusers", "fp32"),
            ("diffusers", "bf16"),
            ("diffusers_bf16_weights", "bf16"),
        ]
    ),
]


def _params(cases=None):
    out = []
    for c in CASES if cases is None else cases:
        marks = []
        if c.device == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _check_bf16(dev: torch.device, precision: str) -> None:
    if dev.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device does not support bf16")


# -- training step -----------------------------------------------------------------------------

#: fastdiff's training settings (TrainConfig's defaults with the CLI's 200-step warm-up, as
#: benchmarks/test_bench_train_sample.py runs them): the anchors run at the same parameters.
TRAIN_T, TRAIN_LR, TRAIN_WARMUP, TRAIN_CLIP, TRAIN_EMA = 1000, 2e-4, 200, 1.0, 0.9999
TRAIN_BATCHES = 4  # the on-device data set: this many batches of random images in [-1, 1]


@dataclasses.dataclass(frozen=True)
class TrainCase:
    device: str
    model: str  # "cifar10" or "small"
    batch: int
    impl: str  # diffusers_example / diffusers_tuned
    precision: str  # bf16: the autocast dtype, as fastdiff's bf16 train cases
    rounds: int
    warmup_rounds: int
    steps_per_call: int  # training steps per timed call

    @property
    def channels_last(self) -> bool:
        return self.impl == "diffusers_tuned"

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32) if self.model == "cifar10" else (3, 16, 16)

    @property
    def id(self) -> str:
        """e.g. cuda-cifar10-b128-bf16-contiguous-diffusers_example (test_train_step's form)."""
        return (
            f"{self.device}-{self.model}-b{self.batch}-{self.precision}-{self.layout}-{self.impl}"
        )

    @property
    def group(self) -> str:
        """test_train_step's group of the same preset, shape and batch."""
        shape = "x".join(map(str, self.image_shape))
        return f"train_step {self.device} {self.model} {shape} b{self.batch}"

    def attrs(self) -> dict:
        """test_train_step's attrs: the summary prints the ratio to each fastdiff side that
        differs in impl alone (example: fastdiff contiguous; tuned: fastdiff channels_last)."""
        return {"impl": self.impl, "precision": self.precision, "layout": self.layout,
                "compile": "off"}  # fmt: skip


#: CUDA: 10 timed calls of 10 steps after 2 warm-up calls (cuDNN's first calls, the lazy
#: optimizer and EMA state): a call is ~0.5-1 s on an H200.  CPU: 1 step per call.
TRAIN_IMPLS = ("diffusers_example", "diffusers_tuned")
TRAIN_CASES = [
    *(TrainCase("cpu", "small", 4, impl, "bf16", 3, 1, 1) for impl in TRAIN_IMPLS),
    *(TrainCase("cuda", "cifar10", 128, impl, "bf16", 10, 2, 10) for impl in TRAIN_IMPLS),
]


class DiffusersTrainer:
    """One training step of diffusers' unconditional example (``diffusers_example``) or its
    tuned variant (``diffusers_tuned``); see the module docstring."""

    def __init__(self, case: TrainCase, dev: torch.device):
        # Here, not at the module's top: diffusers.training_utils imports transformers,
        # accelerate, peft and torchvision where they are installed (the GPU machine has them);
        # should one of those fail to import, only the training anchors skip, not the sampling.
        try:
            from diffusers.optimization import get_scheduler
            from diffusers.training_utils import EMAModel
        except Exception as exc:  # noqa: BLE001 - any import failure of those optional stacks
            pytest.skip(f"diffusers' training utilities do not import: {exc!r}"[:300])
        torch.manual_seed(SEED)
        config = CIFAR10_UNET if case.model == "cifar10" else SMALL_UNET
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        self.model = diffusers.UNet2DModel(**config).to(dev, memory_format=fmt).train()
        self.params = list(self.model.parameters())
        self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=TRAIN_T)
        tuned = case.impl == "diffusers_tuned"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=TRAIN_LR, weight_decay=0.0,
            fused=True if tuned and dev.type == "cuda" else None,
        )  # fmt: skip
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", optimizer=self.optimizer, num_warmup_steps=TRAIN_WARMUP
        )
        # The example's EMA: EMAModel(params, decay, use_ema_warmup=True, inv_gamma=1, power=3/4)
        self.ema = EMAModel(self.params, decay=TRAIN_EMA, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4, foreach=tuned)  # fmt: skip
        # What the example's data loader hands over, already on the device (fp32 in [-1, 1]).
        g = torch.Generator().manual_seed(SEED)
        data = torch.rand(TRAIN_BATCHES * case.batch, *case.image_shape, generator=g) * 2 - 1
        self.batches = data.to(dev, memory_format=fmt).split(case.batch)
        self.weight_dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
        self.autocast = torch.autocast(dev.type, torch.bfloat16, enabled=case.precision == "bf16")
        self.tuned, self.device, self.k = tuned, dev, 0

    def train_step(self) -> torch.Tensor:
        clean = self.batches[self.k % len(self.batches)].to(self.weight_dtype)
        if self.tuned:  # keeps clean's channels_last layout
            noise = torch.randn_like(clean)
        else:
            noise = torch.randn(clean.shape, dtype=self.weight_dtype, device=self.device)
        bsz = clean.shape[0]
        timesteps = torch.randint(0, TRAIN_T, (bsz,), device=self.device).long()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        with self.autocast:
            pred = self.model(noisy, timesteps).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, TRAIN_CLIP)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.params)
        self.k += 1
        return loss.detach()


@pytest.mark.parametrize("case", _params(TRAIN_CASES))
def test_train_step_diffusers(measure_rounds, case):
    dev = torch.device(case.device)
    _check_bf16(dev, case.precision)
    trainer = DiffusersTrainer(case, dev)
    steps = case.steps_per_call

    def fn():
        for _ in range(steps):
            loss = trainer.train_step()
        return loss

    loss = measure_rounds(
        fn,
        group=case.group,
        side=case.id.split(f"b{case.batch}-", 1)[1],
        device=case.device,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        derive=lambda median: {
            "images_per_s": round(case.batch * steps / median, 1),
            "ms_per_step": round(median / steps * 1e3, 3),
        },
        attrs=case.attrs(),
        what="train_step",
        steps_per_call=steps,
        preset=case.model,
        batch=case.batch,
        image_shape=list(case.image_shape),
        channels_last=case.channels_last,
        autocast_dtype="bfloat16" if case.precision == "bf16" else "float32",
        torch_threads=torch.get_num_threads(),
        model="diffusers.UNet2DModel",
        params=sum(p.numel() for p in trainer.params),
    )
    assert torch.isfinite(loss).all()
    assert trainer.k >= steps and trainer.ema.optimization_step == trainer.k
    assert all(torch.isfinite(p).all() for p in trainer.params)


# -- sampling ----------------------------------------------------------------------------------


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
        # strict with the graph: a step that cannot be captured raises, never runs eagerly
        return run_sampler(sampler, case.n, diffusion.image_shape, dev, seed=SEED,
                           batch_size=case.n, cuda_graph=graph, strict=graph)  # fmt: skip

    return fn, sampler


def _diffusers(case: Case, path, dev):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(path), local_files_only=True).to(dev)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    bf16_weights = case.impl == "diffusers_bf16_weights"
    if bf16_weights:  # bf16 weights and latents, no autocast (diffusers logs a note on to())
        unet.to(torch.bfloat16)
    dtype = unet.dtype  # DDPMPipeline draws the latents in the UNet's dtype
    size = unet.config.sample_size
    shape = (case.n, unet.config.in_channels, size, size)
    autocast = torch.autocast(
        dev.type, torch.bfloat16, enabled=case.precision == "bf16" and not bf16_weights
    )

    def fn():
        generator = torch.Generator(device=dev).manual_seed(SEED)
        with torch.inference_mode(), autocast:
            image = randn_tensor(shape, generator=generator, device=dev, dtype=dtype)
            scheduler.set_timesteps(T)
            for t in scheduler.timesteps:
                model_output = unet(image, t).sample
                image = scheduler.step(model_output, t, image, generator=generator).prev_sample
        return image.float().clamp(-1, 1)

    return fn, None


@pytest.mark.parametrize("case", _params())
def test_sample_pipeline(measure_rounds, pipeline_dir, case):
    dev = torch.device(case.device)
    _check_bf16(dev, case.precision)
    path = pipeline_dir(case.model)
    side = _fastdiff if case.impl.startswith("fastdiff") else _diffusers
    fn, sampler = side(case, path, dev)
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
    if case.impl == "fastdiff_graph":
        assert_graph_replayed(sampler, case.n)
