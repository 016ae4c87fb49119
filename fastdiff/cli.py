"""The ``fastdiff`` command line: ``fastdiff train``, ``sample``, ``eval`` and ``export``.

Bad input (a missing checkpoint or data path, an empty image folder, NaN in the data, a model
that does not fit the data, ...) and failed writes (no space left, permission denied, a
read-only file system, an --out that is a file) print one line, ``fastdiff: error: ...``, and
exit with status 2; no traceback (set FASTDIFF_DEBUG=1 to see one).

``fastdiff train`` stopped by SIGTERM or SIGINT finishes the current step, checkpoints it,
prints one line saying where and how to resume, and exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from . import distributed
from .ema import DEFAULT_POWER
from .errors import FastDiffError
from .inception import ENV_PATH, FILE_NAME
from .labels import DEFAULT_CLASS_DROPOUT
from .metrics import DEFAULT_FID_SAMPLER
from .precision import PRECISIONS
from .preemption import TrainingInterrupted
from .samplers import SAMPLERS, SamplerSpec
from .training import LR_SCHEDULES

#: Defaults of ``fastdiff train`` with no arguments: the built-in digits, under 10 minutes on
#: a 2-core CPU including the final 64-image sample grid.  Chosen by measurement with the digits
#: judge (tools/digits_judge.py; docs/PERFORMANCE.md, "Sample quality"): a peak lr of 2e-3
#: with cosine decay beat 2e-4 / 1e-3 / 4e-3 constant at equal steps; the grid's DPM-Solver++
#: 2M with 20 steps scored better than DDIM with 50 (and 1000 DDPM steps) ("DPM-Solver++").
DEFAULT_STEPS = 5000
DEFAULT_OUT = "runs/digits"
DEFAULT_LR = 2e-3
DEFAULT_LR_SCHEDULE = "cosine"
DEFAULT_WARMUP_STEPS = 200
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_SAMPLE_SAMPLER = "dpm++2m"
DEFAULT_SAMPLE_STEPS = 20


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a DDPM (Algorithm 20.1) and write checkpoints and a sample grid",
        description="Train a DDPM on images and write metrics.jsonl, checkpoints/ and"
        " samples.png to the output directory.",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="built-in name (digits), .npz file, or folder of images [digits]",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory [{DEFAULT_OUT}]")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"total optimizer steps [{DEFAULT_STEPS}]"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per step [64]")
    p.add_argument(
        "--preset",
        default=None,
        help="UNet preset: digits, digits_conditional, digits_wide, cifar10, tiny [chosen from"
        " the data and --conditional]",
    )
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="[auto]")
    p.add_argument(
        "--channels-last",
        default="auto",
        choices=["auto", "on", "off"],
        help="memory layout of activations [auto: on for CUDA, off on CPU]",
    )
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="[linear]")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps [1000]")
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"AdamW peak learning rate [{DEFAULT_LR}]"
    )
    p.add_argument(
        "--lr-schedule",
        default=DEFAULT_LR_SCHEDULE,
        choices=LR_SCHEDULES,
        help=f"after the warm-up: constant, or cosine to 0 at --steps [{DEFAULT_LR_SCHEDULE}]",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=DEFAULT_WARMUP_STEPS,
        help=f"linear lr warm-up [{DEFAULT_WARMUP_STEPS}]",
    )
    p.add_argument(
        "--ema-decay", type=float, default=DEFAULT_EMA_DECAY, help=f"[{DEFAULT_EMA_DECAY}]"
    )
    p.add_argument(
        "--ema-power",
        type=float,
        default=DEFAULT_POWER,
        help="EMA warm-up profile: step j weighs about (j/k)^power in the average at step k;"
        f" smaller averages longer [{DEFAULT_POWER:g}]",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize folder images to this size [from the images]",
    )
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (none yet: start at step 0)",
    )
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines [50]")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="steps between checkpoints (0: at the end only) [500]",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=30.0,
        help="also checkpoint every M minutes of wall-clock time (0: off) [30]",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="steps between sample grids in OUT/samples/ (0: final only) [0]",
    )
    p.add_argument("--n-samples", type=int, default=64, help="images in a grid [64]")
    p.add_argument(
        "--sample-sampler",
        default=DEFAULT_SAMPLE_SAMPLER,
        choices=SAMPLERS,
        help=f"sampler of the grids [{DEFAULT_SAMPLE_SAMPLER}]",
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help=f"steps of the grids [{DEFAULT_SAMPLE_STEPS}, or T-1 if smaller]",
    )
    p.add_argument(
        "--fid-every",
        type=int,
        default=0,
        help=f"steps between FID/KID of the EMA model in metrics.jsonl (0: off; needs"
        f" {FILE_NAME}, see fastdiff eval --fid) [0]",
    )
    p.add_argument(
        "--fid-samples", type=int, default=5000, help="samples per FID during training [5000]"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers [0]")
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="CUDA: run the eager training step instead of replaying it as a CUDA graph",
    )
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    p.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional model for classifier-free guidance, on the data's labels"
        " (digits, an .npz 'labels' array, or a folder's class subfolders)",
    )
    p.add_argument(
        "--class-dropout",
        type=float,
        default=DEFAULT_CLASS_DROPOUT,
        help="with --conditional: probability of training a label as the null class"
        f" [{DEFAULT_CLASS_DROPOUT:g}]",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw images from a trained model (Algorithm 20.2)",
        description="Sample images from a checkpoint (a run's output directory or a"
        " checkpoint directory) and write a PNG grid or an .npz of the images.",
    )
    p.add_argument(
        "checkpoint",
        help="run output directory, checkpoint directory, or diffusers pipeline/UNet2DModel folder",
    )
    p.add_argument("-n", "--n", type=int, default=64, help="number of images [64]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument(
        "--out",
        default="samples.png",
        help="output .png (grid) or .npz (uint8 images, N C H W) [samples.png]",
    )
    p.add_argument("--batch-size", type=int, default=None, help="[min(n, 256)]")
    p.add_argument(
        "--sampler",
        default="dpm++2m",
        choices=SAMPLERS,
        help="ddpm: all T steps (Algorithm 20.2); ddim, dpm++2m (DPM-Solver++ 2M, as"
        " diffusers' DPMSolverMultistepScheduler): --steps steps [dpm++2m: the best judged"
        " quality per model call, docs/PERFORMANCE.md]",
    )
    p.add_argument("--steps", type=int, default=None, help="ddim [50] or dpm++2m [20] steps")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise scale in [0, 1] [0]")
    clip = p.add_mutually_exclusive_group()
    clip.add_argument(
        "--clip",
        action="store_true",
        help="clamp the predicted x0 to [-1, 1] at every step [on for ddim, off otherwise]",
    )
    clip.add_argument("--no-clip", action="store_true", help="ddim: do not clamp x0")
    p.add_argument(
        "--clip-rule",
        default="rederive",
        choices=["rederive", "diffusers"],
        help="ddim with a clamped x0: re-derive eps from it, or keep the model's eps as"
        " diffusers' DDIMScheduler does [rederive]",
    )
    p.add_argument(
        "--variance",
        default=None,
        choices=["beta", "posterior"],
        help="ddpm variance [beta, or what a diffusers scheduler config says]",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument(
        "--label",
        action="append",
        default=None,
        help="conditional model: the class to generate (repeatable: one grid row per label;"
        " 'all': one row per class; -n images split between the rows) [the null class]",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance s: eps_u + s (eps_c - eps_u); 1 = conditional model"
        " alone [sampling.DEFAULT_GUIDANCE_SCALE]",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="eager sampling on CUDA")
    p.add_argument(
        "--precision", default=None, choices=PRECISIONS, help="[auto for the sampling device]"
    )
    p.add_argument("--device", default=None, help="[cuda if available]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_sample)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the evidence lower bound in bits per dimension, or --fid / --kid of samples",
        description="Evaluate the DDPM bound (prior + diffusion KL terms + discretized"
        " Gaussian decoder) on images, in bits/dim; T model calls per batch. With --fid: draw"
        " N samples and print their FID (and with --kid their KID) against --ref on"
        " Inception-v3 pool features (fastdiff.metrics).",
    )
    p.add_argument(
        "checkpoint",
        help="run output directory, checkpoint directory, or diffusers pipeline/UNet2DModel folder",
    )
    p.add_argument(
        "--data", default="digits", help="built-in name, .npz file or folder of images [digits]"
    )
    p.add_argument(
        "-n",
        "--n",
        type=int,
        default=None,
        help="bound: the first N images (0: all) [256]; --fid: N samples [50000]",
    )
    p.add_argument("--batch-size", type=int, default=64, help="[64]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument(
        "--variance",
        default=None,
        choices=["beta", "posterior"],
        help="the model's reverse variance sigma_t^2 [beta, or its diffusers scheduler's]",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--device", default=None, help="[cuda if available]")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    fid = p.add_argument_group("FID / KID")
    fid.add_argument("--fid", action="store_true", help="FID of N samples against --ref")
    fid.add_argument("--kid", action="store_true", help="also KID with its std over subsets")
    fid.add_argument(
        "--ref",
        default=None,
        help="reference images: digits, a folder or an .npz [the run's training data]",
    )
    fid.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help=f"[{DEFAULT_FID_SAMPLER[0]} with {DEFAULT_FID_SAMPLER[1]} steps, at most T]",
    )
    fid.add_argument("--steps", type=int, default=None, help="sampler steps")
    fid.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="the model's autocast while sampling; the result names it [auto: bf16 on a recent"
        " GPU]",
    )
    fid.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help=f"the {FILE_NAME} file [${ENV_PATH}, else the cache, else downloaded]",
    )
    p.set_defaults(run=_run_eval)


def _run_fid(args) -> int:
    """``fastdiff eval --fid``: the network first (a missing file fails before any work)."""
    import json

    from .diffusion import load
    from .inception import load_network
    from .metrics import default_sampler, evaluate
    from .precision import resolve_device

    n = 50000 if args.n is None else args.n
    if n < 2:
        raise FastDiffError(f"--n: expected at least 2 samples for FID, got {n}")
    network = load_network(args.inception, device=resolve_device(args.device))
    diffusion = load(args.checkpoint, device=args.device)
    ref = args.ref or diffusion.config.get("data")
    if ref is None:
        raise FastDiffError("--ref: the run does not record its training data; pass --ref")
    default = default_sampler(diffusion.schedule.T)
    sampler = (args.sampler or default[0], args.steps if args.sampler else args.steps or default[1])
    result = evaluate(
        diffusion,
        ref=ref,
        n=n,
        sampler=sampler,
        with_kid=args.kid,
        network=network,
        seed=args.seed,
        batch_size=args.batch_size,
        use_ema=not args.no_ema,
        precision=args.precision,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    steps = f" {result['steps']} steps" if result["steps"] else ""
    print(
        f"FID {result['fid']:.4f} ({result['n']} samples, {result['sampler']}{steps},"
        f" {result['precision']};"
        f" {result['ref_n']} reference images)"
    )
    if args.kid:
        print(f"KID {result['kid']:.6f} +- {result['kid_std']:.6f}")
    return 0


def _run_eval(args) -> int:
    import json

    import torch

    from .data import resolve_data
    from .diffusion import load
    from .elbo import bits_per_dim
    from .labels import resolve_labelled_data

    if args.fid or args.kid:
        return _run_fid(args)
    args.n = 256 if args.n is None else args.n
    if args.n < 0:
        raise FastDiffError(f"--n: expected 0 (all) or a positive count, got {args.n}")
    diffusion = load(args.checkpoint, device=args.device)
    labels = None
    if diffusion.num_classes is not None:  # conditional: the data's labels, log p(x | y)
        images, labels, _ = resolve_labelled_data(args.data, image_size=diffusion.image_shape[1])
    else:
        images = resolve_data(
            args.data, image_size=diffusion.image_shape[1], channels=diffusion.image_shape[0]
        )
    if not isinstance(images, torch.Tensor):
        raise FastDiffError("--data: eval needs an image tensor source (.npz, folder, built-in)")
    images = images[: args.n] if args.n else images
    labels = labels[: args.n] if labels is not None and args.n else labels
    result = bits_per_dim(
        diffusion,
        images,
        batch_size=args.batch_size,
        seed=args.seed,
        use_ema=not args.no_ema,
        variance=args.variance or diffusion.sampling_default("variance", "beta"),
        progress=not args.no_progress,
        labels=labels,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['bits_per_dim']:.4f} bits/dim on {result['images']} images"
            f" (prior {result['prior']:.4f}, diffusion {result['diffusion']:.4f},"
            f" decoder {result['decoder']:.4f})"
            + (
                f"; conditional on the data's labels (-log p(x | y), {diffusion.num_classes}"
                " classes)"
                if result["conditional"]
                else ""
            )
        )
    return 0


def _run_train(args) -> int:
    from .training import train

    out = Path(args.out)
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    train(
        args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        preset=args.preset,
        precision=args.precision,
        channels_last=cl,
        schedule=args.schedule,
        T=args.T,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay,
        ema_power=args.ema_power,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
        out_dir=out,
        resume=args.resume,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        sample_every=args.sample_every,
        n_samples=args.n_samples,
        sample_sampler=args.sample_sampler,
        sample_steps=_grid_steps(args),
        fid_every=args.fid_every,
        fid_samples=args.fid_samples,
        num_workers=args.workers,
        progress=not args.no_progress,
        cuda_graph=not args.no_cuda_graph,
        compile=args.compile,
        conditional=args.conditional,
        class_dropout=args.class_dropout,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        print(f"wrote {out / 'samples.png'}, {out / 'metrics.jsonl'} and {out / 'checkpoints'}/")
    return 0


def _grid_steps(args) -> int | None:
    """--sample-steps as given (train() checks it), else for the default grid sampler
    (dpm++2m) DEFAULT_SAMPLE_STEPS capped at --T - 1 (its most)."""
    if args.sample_steps is not None or args.sample_sampler != DEFAULT_SAMPLE_SAMPLER:
        return args.sample_steps
    return min(DEFAULT_SAMPLE_STEPS, args.T - 1)


def _run_sample(args) -> int:
    from .diffusion import load, sample
    from .images import save_image_grid, to_uint8

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise FastDiffError(f"--out: expected a .png or .npz file name, got {str(out)!r}")
    spec = SamplerSpec.checked(
        name=args.sampler,
        steps=args.steps,
        eta=args.eta,
        clip_x0=True if args.clip else False if args.no_clip else None,
        clip_rule=args.clip_rule,
        variance=args.variance,
        names={"name": "--sampler", "steps": "--steps", "eta": "--eta"},
    )
    diffusion = load(args.checkpoint, device=args.device)
    n, labels, nrow = _label_rows(args.label, args.n, diffusion.num_classes)
    images = sample(
        diffusion,
        n,
        labels=labels,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=spec,
        use_ema=not args.no_ema,
        cuda_graph=not args.no_cuda_graph,
        precision=args.precision,
        progress=not args.no_progress,
    )
    if out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=to_uint8(images).cpu().numpy())
    else:
        save_image_grid(images, out, nrow, scale=max(1, 64 // max(diffusion.image_shape[1:])))
    print(f"wrote {n} images to {out}")
    return 0


def _label_rows(given: list[str] | None, n: int, num_classes: int | None):
    """(image count, labels or None, images per grid row) for --label: one row per label
    (``all``: per class), n // rows images each (at least 1); no --label: n null-class or
    unconditional images."""
    if not given:
        return n, None, None
    if num_classes is None:
        raise FastDiffError("--label: this model is unconditional (trained without --conditional)")
    if given == ["all"]:
        rows = list(range(num_classes))
    else:
        try:
            rows = [int(v) for v in given]
        except ValueError:
            raise FastDiffError(
                f"--label: expected class numbers 0..{num_classes - 1} or 'all', got {given}"
            ) from None
    if n < 1:
        raise FastDiffError(f"--n: expected a positive count, got {n}")
    per = max(1, n // len(rows))
    labels = [label for label in rows for _ in range(per)]
    return len(labels), labels, per


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained model as a diffusers DDPMPipeline directory",
        description="Write RUN (a run output directory or a checkpoint) as a DDPMPipeline"
        " directory DIR (model_index.json, unet/, scheduler/) that"
        " diffusers.DDPMPipeline.from_pretrained(DIR) loads. DIR must be new or empty.",
    )
    p.add_argument("source", metavar="RUN", help="run output directory or checkpoint directory")
    p.add_argument("dir", metavar="DIR", help="the pipeline directory to create")
    p.add_argument("--format", default="diffusers", choices=["diffusers"], help="[diffusers]")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .diffusion import load

    diffusion = load(args.source, device="cpu")
    use_ema = not args.no_ema and diffusion.ema_model is not None
    path = diffusion.save(args.dir, format=args.format, use_ema=use_ema)
    weights = "EMA" if use_ema else "raw"
    print(f"wrote a {args.format} DDPMPipeline with the {weights} weights to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff", description="Train and sample Denoising Diffusion Probabilistic Models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,eval,export}")
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_export(sub)
    return parser


def _stopped_line(exc: TrainingInterrupted, argv: list[str]) -> str:
    """The one line printed when a signal stopped ``fastdiff train``: where and how to resume."""
    if exc.checkpoint is None:
        return f"fastdiff: {exc}"
    args = list(argv) if "--resume" in argv else [*argv, "--resume"]
    command = shlex.join(["fastdiff", *args])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        command += f" (under the same launcher, {world} processes)"
    return f"fastdiff: {exc}; resume with: {command}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports a stop
    try:
        return args.run(args)
    except (FastDiffError, ValueError, TypeError, OSError) as exc:
        # FastDiffError: bad data or checkpoint; ValueError/TypeError: a bad argument value,
        # raised by validation before any work with a message naming the argument; OSError:
        # a failed read or write (fastdiff.errors.OutputError names the path and the cause).
        if os.environ.get("FASTDIFF_DEBUG"):
            raise
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if main_rank:
            print(_stopped_line(exc, argv), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()  # a process group train() made ends before the interpreter


def run() -> None:
    """The ``fastdiff`` command: ``main()``, then the process's exit (see
    ``distributed.exit_process``: after multi-process training it skips exit-time destructors)."""
    distributed.exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    run()
