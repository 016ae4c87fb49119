"""A digits judge: how close generated 16x16 digits are to real ones, by an independent classifier.

A small CNN is trained (fixed seed, ~10 s on 2 CPU cores) on 1197 of the 1797 built-in digits
(``fastdiff.data``'s "digits", 1x16x16 in [-1, 1]); the other 600 are held out: 400 form the
reference set and 200 the "real" comparison set.  For N images it reports

    fd          Frechet distance between the Gaussians fitted to the classifier's penultimate
                features (64-d) of the images and of the reference set (lower is better):
                |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    fd_mean     its mean term |mu1 - mu2|^2 (how far the average image is off)
    confidence  mean max-softmax probability (how sure the classifier is of each image)
    histogram   how many images fall in each predicted class 0..9

and, as the scale, the same figures for 200 held-out real digits (the floor: finite-sample
noise of the estimate) and 200 images of uniform noise in [-1, 1] (the ceiling).  Every image is
quantised to 8 bits first, as a saved PNG/.npz would be.  The trained weights are cached (keyed
by a hash of the data, the architecture and the training settings) in ``$FASTDIFF_CACHE`` or
``~/.cache/fastdiff``; training is deterministic, so deleting the cache only costs time.

Usage (from a checkout, with fastdiff installed)::

    python tools/digits_judge.py runs/digits                 # 200 DDPM samples, seed 0
    python tools/digits_judge.py runs/digits --sampler ddim --steps 100
    python tools/digits_judge.py runs/digits --precision fp32   # sampling precision [auto]
    python tools/digits_judge.py images.npz                  # e.g. from `fastdiff sample --out`
    python tools/digits_judge.py --reference                 # floor and ceiling only
    python tools/digits_judge.py runs/digits --table         # every sampler setting (TABLE)
    python tools/digits_judge.py runs/digits --table steps -n 1000   # FD vs steps (STEPS_TABLE):
                                                             # ddim / dpm++2m at 5..50 steps
    python tools/digits_judge.py runs/digits --eval-loss     # the low-noise training proxy
    python tools/digits_judge.py runs/digits-cond --guidance-table --sampler ddim --steps 100
    python tools/digits_judge.py runs/digits-cond --guidance-table --scales 2 --per-class 100

``--guidance-table`` (a class-conditional run): for each guidance scale in GUIDANCE_SCALES,
``--per-class`` images of every class, asked for with ``labels=``; the class accuracy (the
fraction the judge assigns to the class asked for), per class and its minimum, and the FD of
all of them; then the FD of as many null-class (unconditional) samples.

``--eval-loss`` needs no sampling: the noise-prediction loss of the checkpoint's EMA model on
all 1797 digits with 4 fixed (t, eps) draws each (seeded), i.e. the training objective with
its sampling noise removed, which ranks checkpoints of one data set far more steadily than a
200-image FD does; overall and per band of t, and for a class-conditional model both for its
null class and with the digits' labels.

Importable: ``train_judge``, ``judge_images``, ``frechet_distance``, ``frechet_terms``,
``reference_scores``, ``sample_images``, ``eval_loss``, ``eval_losses``, ``class_accuracy``,
``run_guidance_table``.
Not a test and not a benchmark: plain ``pytest`` does not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.resources
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastdiff.images import to_model_range, to_uint8
from fastdiff.metrics import frechet_distance as frechet_distance_of_stats

#: (train, reference, real-comparison) sizes of the fixed split of the 1797 built-in digits.
SPLIT = (1197, 400, 200)
FEATURES = 64
TRAIN = dict(epochs=20, batch_size=64, lr=3e-3, seed=0, shift=1)
_VERSION = 1  # bump when the architecture or the training loop changes (invalidates caches)


class JudgeNet(nn.Module):
    """conv(1->16) pool conv(16->32) pool -> 32*4*4 -> 64 features (ReLU) -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) in [-1, 1] -> (N, 64) penultimate features."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits: images (1797, 1, 16, 16) float32 in [-1, 1], labels (1797,) int64."""
    resource = importlib.resources.files("fastdiff.assets").joinpath("digits16.npz")
    with resource.open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    return to_model_range(images), torch.from_numpy(labels.astype(np.int64))


def split_digits():
    """Fixed split (numpy seed 0): dict of (images, labels) for "train", "reference", "real"."""
    images, labels = load_digits()
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(images)))
    bounds = np.cumsum((0, *SPLIT))
    names = ("train", "reference", "real")
    return {
        name: (images[order[lo:hi]], labels[order[lo:hi]])
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)
    }


def _cache_path(images: torch.Tensor) -> Path:
    root = Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff")
    key = hashlib.sha256(
        images.numpy().tobytes() + json.dumps([_VERSION, SPLIT, FEATURES, TRAIN]).encode()
    ).hexdigest()[:16]
    return root / f"digits_judge-{key}.pt"


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image translated by up to max_shift pixels (padded with background, -1)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, (2 * max_shift + 1) ** 2, (len(x),), generator=gen)
    for k in range((2 * max_shift + 1) ** 2):  # one slice per offset, not per image
        idx = (offsets == k).nonzero().flatten()
        dy, dx = divmod(k, 2 * max_shift + 1)
        out[idx] = pad[idx, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return out


def train_judge(*, cache: bool = True, verbose: bool = False) -> JudgeNet:
    """The judge classifier: loaded from the cache, or trained (deterministically) and cached."""
    data = split_digits()
    images, labels = data["train"]
    path = _cache_path(images)
    net = JudgeNet()
    if cache and path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    start = time.perf_counter()
    with _one_thread():
        net = _train(images, labels)
    if verbose:
        acc = held_out_accuracy(net)
        print(f"judge trained in {time.perf_counter() - start:.1f} s, held-out accuracy {acc:.3f}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
    return net


@contextlib.contextmanager
def _one_thread():
    """The net is tiny: one thread is as fast on a quiet CPU and ~10x faster on a busy one
    (measured: 7 s vs 85 s wall with the 2 cores shared by other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(images: torch.Tensor, labels: torch.Tensor) -> JudgeNet:
    """Adam with a one-cycle lr, random 1-pixel shifts; deterministic for a given seed."""
    torch.manual_seed(TRAIN["seed"])
    net = JudgeNet()
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=TRAIN["lr"])
    steps_per_epoch = len(images) // TRAIN["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, TRAIN["lr"], total_steps=TRAIN["epochs"] * steps_per_epoch
    )
    net.train()
    for _ in range(TRAIN["epochs"]):
        order = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * TRAIN["batch_size"] : (b + 1) * TRAIN["batch_size"]]
            x = _shift(images[idx], gen, TRAIN["shift"])
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def held_out_accuracy(net: JudgeNet) -> float:
    data = split_digits()
    x = torch.cat([data["reference"][0], data["real"][0]])
    y = torch.cat([data["reference"][1], data["real"][1]])
    return float((net(x).argmax(1) == y).float().mean())


def frechet_terms(f1: np.ndarray, f2: np.ndarray) -> dict:
    """The Frechet distance between Gaussians fitted to feature sets (n1, d) and (n2, d), and its
    mean term: ``{"fd": |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), "fd_mean": |mu1 - mu2|^2}``
    (float64; the distance is ``fastdiff.metrics.frechet_distance`` of the fitted statistics).
    The mean term moves with the images' average features (e.g. their class mix); the rest
    compares the covariances."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    fd = frechet_distance_of_stats(mu1, np.cov(f1, rowvar=False), mu2, np.cov(f2, rowvar=False))
    return {"fd": fd, "fd_mean": float(((mu1 - mu2) ** 2).sum())}


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets (n1, d) and (n2, d)."""
    return frechet_terms(f1, f2)["fd"]


def _as_judge_input(images) -> torch.Tensor:
    """Any (N, 1, 16, 16) images (uint8 0..255 or floats in [-1, 1]) -> 8-bit-quantised floats."""
    x = torch.as_tensor(images).detach().cpu()
    if tuple(x.shape[1:]) != (1, 16, 16):
        raise ValueError(f"images: expected shape (N, 1, 16, 16), got {tuple(x.shape)}")
    if x.is_floating_point():
        x = to_uint8(to_model_range(x, name="images"))
    return to_model_range(x, name="images")


@torch.no_grad()
def judge_images(images, net: JudgeNet | None = None) -> dict:
    """fd (to the reference set), mean max-softmax confidence and class histogram of images."""
    net = net or train_judge()
    x = _as_judge_input(images)
    with _one_thread():
        ref_features = net.features(split_digits()["reference"][0]).numpy()
        features = net.features(x)
    probs = net.head(features).softmax(1)
    return {
        "n": len(x),
        **frechet_terms(features.numpy(), ref_features),
        "confidence": float(probs.max(1).values.mean()),
        "histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
    }


def reference_scores(net: JudgeNet | None = None, seed: int = 0) -> dict:
    """The judge's scale: 200 held-out real digits (floor) and 200 uniform-noise images."""
    net = net or train_judge()
    real = split_digits()["real"][0]
    noise = torch.rand(len(real), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return {"real": judge_images(real, net), "noise": judge_images(noise * 2 - 1, net)}


def sample_images(checkpoint, n: int = 200, *, seed: int = 0, **sample_kwargs) -> torch.Tensor:
    """n images from a run directory or checkpoint with ``fastdiff.sample(**sample_kwargs)``."""
    from fastdiff import load, sample

    diffusion = load(checkpoint, device="cpu")
    if tuple(diffusion.image_shape) != (1, 16, 16):
        raise ValueError(
            f"checkpoint: makes {diffusion.image_shape} images, the judge needs 1x16x16"
        )
    return sample(diffusion, n, seed=seed, **sample_kwargs).cpu()


@torch.no_grad()
def eval_loss(checkpoint, draws: int = 4, seed: int = 123, batch_size: int = 256) -> float:
    """mean ||g(z_t, t) - eps||^2 of the EMA model over all digits x ``draws`` fixed (t, eps)
    (a class-conditional model: its null class)."""
    return float(eval_losses(checkpoint, draws, seed, batch_size)[0].mean())


@torch.no_grad()
def eval_losses(
    checkpoint, draws: int = 4, seed: int = 123, batch_size: int = 256, labelled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, t), both (1797 * draws,): ||g(z_t, t[, y]) - eps||^2 per image and draw for
    the EMA model, with the digits' labels y when ``labelled`` (a class-conditional model),
    else unconditionally (the null class of a conditional model).  ``checkpoint``: a run
    directory / checkpoint, or a loaded Diffusion."""
    from fastdiff import Diffusion, load

    diffusion = checkpoint if isinstance(checkpoint, Diffusion) else load(checkpoint, device="cpu")
    if labelled and diffusion.num_classes is None:
        raise ValueError("labelled: this checkpoint is unconditional")
    net = diffusion.ema_model if diffusion.ema_model is not None else diffusion.model
    images, labels = load_digits()
    x, y = images.repeat(draws, 1, 1, 1), labels.repeat(draws)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, diffusion.schedule.T, (len(x),), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    ac = diffusion.schedule.alphas_cumprod.float()
    losses = torch.empty(len(x))
    for i in range(0, len(x), batch_size):
        rows = slice(i, i + batch_size)
        a = ac[t[rows]].view(-1, 1, 1, 1)
        z = a.sqrt() * x[rows] + (1 - a).sqrt() * eps[rows]
        pred = net(z, t[rows], y[rows]) if labelled else net(z, t[rows])
        losses[rows] = ((pred.float() - eps[rows]) ** 2).mean(dim=(1, 2, 3))
    return losses, t


#: t bands of ``--eval-loss``'s breakdown (T = 1000 steps).
EVAL_BANDS = (0, 50, 200, 400, 600, 800, 1000)


def print_eval_losses(checkpoint, draws: int = 4) -> None:
    """The eval loss, overall and per t band (markdown); for a conditional model both its
    null class and its labelled (conditional) prediction."""
    from fastdiff import load

    diffusion = load(checkpoint, device="cpu")
    rows = [("unconditional", False)]
    if diffusion.num_classes is not None:
        rows = [("null class", False), ("conditional", True)]
    bands = list(zip(EVAL_BANDS[:-1], EVAL_BANDS[1:], strict=True))
    print("| prediction | all t | " + " | ".join(f"t {lo}-{hi - 1}" for lo, hi in bands) + " |")
    print("|---" * (len(bands) + 2) + "|")
    for name, labelled in rows:
        losses, t = eval_losses(diffusion, draws, labelled=labelled)
        cells = [losses.mean()] + [losses[(t >= lo) & (t < hi)].mean() for lo, hi in bands]
        print(f"| {name} | " + " | ".join(f"{float(c):.5f}" for c in cells) + " |")


def load_npz_images(path) -> torch.Tensor:
    """``images`` from an .npz (uint8 N C H W as ``fastdiff sample --out x.npz`` writes)."""
    with np.load(path) as npz:
        if "images" not in npz:
            raise ValueError(f"{path}: expected an array named 'images', found {list(npz)}")
        return torch.from_numpy(npz["images"])


#: The sampler settings of ``--table`` (issue 8's table): (label, fastdiff.sample kwargs).
TABLE = [
    ("DDPM, 1000 steps (default)", dict(sampler="ddpm")),
    ("DDPM, posterior variance", dict(sampler="ddpm", variance="posterior")),
    ("DDPM, x0 clipped", dict(sampler="ddpm", clip_x0=True)),
    *[
        (f"DDIM {steps} steps, {label}", dict(sampler="ddim", steps=steps, **kwargs))
        for steps in (50, 100, 250)
        for label, kwargs in [
            ("x0 clipped, eps re-derived (default)", {}),
            ("x0 clipped, diffusers rule", dict(clip_rule="diffusers")),
            ("no clip", dict(clip_x0=False)),
        ]
    ],
]


#: ``--table steps``: FD against the number of steps, DDIM (its defaults: x0 clipped, eps
#: re-derived) beside DPM-Solver++ 2M (its diffusers defaults: no clipping; and with x0
#: clipped, diffusers' thresholding at 1), and DDIM 100 (the training grids' default) as the
#: bar for dpm++2m at 20.
STEPS_TABLE = [
    *[
        (f"{label} {steps} steps", dict(sampler=sampler, steps=steps, **kwargs))
        for sampler, label, kwargs in (
            ("ddim", "DDIM", {}),
            ("dpm++2m", "DPM-Solver++ 2M", {}),
            ("dpm++2m", "DPM-Solver++ 2M x0 clipped,", dict(clip_x0=True)),
        )
        for steps in (5, 10, 15, 20, 25, 50)
    ],
    ("DDIM 100 steps", dict(sampler="ddim", steps=100)),
]
TABLES = {"samplers": TABLE, "steps": STEPS_TABLE}


def run_table(
    checkpoint, net: JudgeNet, n: int = 200, seed: int = 0, as_json: bool = False, table=TABLE
):
    """Judge every setting of ``table`` (TABLE or STEPS_TABLE) on one checkpoint; print a
    markdown table (or JSON lines)."""
    if not as_json:
        print(f"| sampler ({n} images, seed {seed}) | FD | confidence | classes 0-9 | time |")
        print("|---|---|---|---|---|")
    for name, result in reference_scores(net).items():
        _print_row(
            f"({name} digits)" if name == "real" else "(uniform noise)", result, None, as_json
        )
    for label, kwargs in table:
        start = time.perf_counter()
        result = judge_images(sample_images(checkpoint, n, seed=seed, **kwargs), net)
        _print_row(label, result, time.perf_counter() - start, as_json)


#: The guidance scales of ``--guidance-table`` (s of eps_u + s (eps_c - eps_u)).
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)


@torch.no_grad()
def class_accuracy(images, labels: torch.Tensor, net: JudgeNet, num_classes: int) -> list[float]:
    """Per class c: the fraction of the images asked for as c that the judge assigns to c."""
    with _one_thread():
        predicted = net(_as_judge_input(images)).argmax(1)
    hits = predicted == labels
    return [float(hits[labels == c].float().mean()) for c in range(num_classes)]


def run_guidance_table(checkpoint, net: JudgeNet, per_class: int = 20, seed: int = 0,
                       scales=GUIDANCE_SCALES, as_json: bool = False, **sample_kwargs):  # fmt: skip
    """Class accuracy and FD of a conditional checkpoint's samples against the guidance scale,
    and the FD of its null-class samples; a markdown table (or JSON lines)."""
    from fastdiff import load, sample

    diffusion = load(checkpoint, device="cpu")
    k = diffusion.num_classes
    if k is None or k > 10:
        raise ValueError(f"checkpoint: expected a class-conditional digits model, got {k=}")
    labels = torch.arange(k).repeat_interleave(per_class)
    if not as_json:
        print(f"| guidance scale ({per_class} per class, seed {seed}) | min class accuracy |"
              " mean | per class 0-9 | FD | time |")  # fmt: skip
        print("|---|---|---|---|---|---|")
    rows = [(f"s = {s:g}", dict(labels=labels, guidance_scale=s)) for s in scales]
    rows.append(("null class (labels=None)", dict(labels=None)))
    for name, kw in rows:
        start = time.perf_counter()
        images = sample(diffusion, len(labels), seed=seed, **kw, **sample_kwargs).cpu()
        result = judge_images(images, net)
        if kw["labels"] is not None:
            result["accuracy"] = class_accuracy(images, labels, net, k)
        seconds = time.perf_counter() - start
        if as_json:
            print(json.dumps({"name": name, **result, "seconds": seconds}), flush=True)
            continue
        acc = result.get("accuracy")
        cells = (
            ("-", "-", "-")
            if acc is None
            else (
                f"{min(acc):.3f}",
                f"{sum(acc) / len(acc):.3f}",
                " ".join(f"{a:.2f}" for a in acc),
            )
        )
        print(f"| {name} | {' | '.join(cells)} | {result['fd']:.2f} | {seconds:.0f} s |",
              flush=True)  # fmt: skip


def _print_row(label: str, result: dict, seconds: float | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": label, **result, "seconds": seconds}), flush=True)
        return
    took = f"{seconds:.0f} s" if seconds is not None else ""
    hist = " ".join(str(h) for h in result["histogram"])
    print(
        f"| {label} | {result['fd']:.2f} | {result['confidence']:.3f} | {hist} | {took} |",
        flush=True,
    )


def _format(name: str, result: dict, seconds: float | None = None) -> str:
    took = f"  ({seconds:.0f} s)" if seconds is not None else ""
    return (
        f"{name}: FD {result['fd']:.2f} (mean term {result['fd_mean']:.2f}),"
        f" confidence {result['confidence']:.3f},"
        f" classes {result['histogram']}{took}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", help="run dir / checkpoint to sample, or an .npz")
    p.add_argument("--reference", action="store_true", help="print the floor and ceiling")
    p.add_argument("-n", type=int, default=200, help="images to sample [200]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm++2m"], help="[ddpm]")
    p.add_argument("--steps", type=int, default=None, help="ddim [50] / dpm++2m [20] steps")
    p.add_argument("--variance", default="beta", choices=["beta", "posterior"], help="[beta]")
    p.add_argument("--eta", type=float, default=0.0, help="[0]")
    p.add_argument(
        "--clip", default="auto", choices=["auto", "on", "off"], help="clamp x0 [auto: ddim on]"
    )
    p.add_argument("--clip-rule", default="rederive", choices=["rederive", "diffusers"])
    p.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="sampling autocast [auto: bf16 on CPUs with AVX-512 BF16 or AMX, else fp32]",
    )
    p.add_argument("--label", default=None, help="name printed for the result")
    p.add_argument("--json", action="store_true", help="print one JSON line per result")
    p.add_argument(
        "--table",
        nargs="?",
        const="samplers",
        choices=sorted(TABLES),
        help="judge every sampler setting of TABLE (samplers, the default) or STEPS_TABLE"
        " (steps: ddim and dpm++2m at 5-50 steps) (markdown)",
    )
    p.add_argument(
        "--eval-loss", action="store_true", help="print the EMA model's fixed-noise eval loss"
    )
    p.add_argument(
        "--guidance-table",
        action="store_true",
        help="conditional run: class accuracy and FD against the guidance scale (markdown)",
    )
    p.add_argument("--per-class", type=int, default=20, help="--guidance-table images [20]")
    p.add_argument(
        "--scales",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        default=GUIDANCE_SCALES,
        help="--guidance-table scales, comma-separated [0,1,2,3,5]",
    )
    args = p.parse_args(argv)
    if not args.source and not args.reference:
        p.error("give a run directory, checkpoint or .npz, or --reference")
    if args.eval_loss:
        if not args.source or str(args.source).endswith(".npz"):
            p.error("--eval-loss needs a run directory or checkpoint")
        print_eval_losses(args.source)
        return 0
    net = train_judge(verbose=not args.json)
    if args.guidance_table:
        if not args.source or str(args.source).endswith(".npz"):
            p.error("--guidance-table needs a conditional run directory or checkpoint")
        run_guidance_table(
            args.source, net, per_class=args.per_class, seed=args.seed, as_json=args.json,
            scales=args.scales, sampler=args.sampler, steps=args.steps, variance=args.variance,
            eta=args.eta,
            clip_x0={"auto": None, "on": True, "off": False}[args.clip],
            clip_rule=args.clip_rule, precision=args.precision,
        )  # fmt: skip
        return 0
    if args.table:
        if not args.source or str(args.source).endswith(".npz"):
            p.error("--table needs a run directory or checkpoint to sample")
        run_table(
            args.source, net, n=args.n, seed=args.seed, as_json=args.json,
            table=TABLES[args.table],
        )  # fmt: skip
        return 0
    results = []
    if args.reference:
        for name, result in reference_scores(net).items():
            results.append((name, result, None))
    if args.source:
        start = time.perf_counter()
        if str(args.source).endswith(".npz"):
            images = load_npz_images(args.source)
        else:
            images = sample_images(
                args.source,
                args.n,
                seed=args.seed,
                sampler=args.sampler,
                steps=args.steps,
                variance=args.variance,
                eta=args.eta,
                clip_x0={"auto": None, "on": True, "off": False}[args.clip],
                clip_rule=args.clip_rule,
                precision=args.precision,
            )
        label = args.label or str(args.source)
        results.append((label, judge_images(images, net), time.perf_counter() - start))
    for name, result, seconds in results:
        if args.json:
            print(json.dumps({"name": name, **result, "seconds": seconds}))
        else:
            print(_format(name, result, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
