"""Seconds per 10k images of FID feature extraction, with a stand-in for inception-2015-12-05.pt.

The real TorchScript file could not be obtained here (docs/PERFORMANCE.md, "FID"), so this
times a plain-torch re-implementation of the same architecture -- the TensorFlow FID
Inception-v3 as pytorch-fid rebuilds it (Conv/BN(eps 1e-3)/ReLU stem, Mixed_5b..Mixed_7c with
the FID variants of InceptionA/C/E pooling, 2048-d average pool) -- with random weights, fed
exactly like the real one: uint8 (N, 3, H, W) in, bilinear resize to 299x299 and
(x - 128) / 128 inside.  The FLOPs and memory traffic are those of the real network; the
weights' values do not change the time.  Not a pytest file (not collected).

    python benchmarks/fid_inception_speed.py [--images 64] [--batch 32] [--size 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Sequential):
    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__(
            nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU()
        )


def _pool_avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class MixedA(nn.Module):  # InceptionA: 64 + 64 + 96 + pool_features
    def __init__(self, cin, pool):
        super().__init__()
        self.b1 = Conv(cin, 64, 1)
        self.b5 = nn.Sequential(Conv(cin, 48, 1), Conv(48, 64, 5, p=2))
        self.b3 = nn.Sequential(Conv(cin, 64, 1), Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1))
        self.bp = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(_pool_avg(x))], 1)


class MixedB(nn.Module):  # InceptionB: 384 + 96 + cin, stride 2
    def __init__(self, cin):
        super().__init__()
        self.b3 = Conv(cin, 384, 3, s=2)
        self.bd = nn.Sequential(Conv(cin, 64, 1), Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2))

    def forward(self, x):
        return torch.cat([self.b3(x), self.bd(x), F.max_pool2d(x, 3, 2)], 1)


class MixedC(nn.Module):  # InceptionC: 4 x 192, factorised 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.b1 = Conv(cin, 192, 1)
        self.b7 = nn.Sequential(
            Conv(cin, c7, 1), Conv(c7, c7, (1, 7), p=(0, 3)), Conv(c7, 192, (7, 1), p=(3, 0))
        )
        self.bd = nn.Sequential(
            Conv(cin, c7, 1),
            Conv(c7, c7, (7, 1), p=(3, 0)),
            Conv(c7, c7, (1, 7), p=(0, 3)),
            Conv(c7, c7, (7, 1), p=(3, 0)),
            Conv(c7, 192, (1, 7), p=(0, 3)),
        )
        self.bp = Conv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b7(x), self.bd(x), self.bp(_pool_avg(x))], 1)


class MixedD(nn.Module):  # InceptionD: 320 + 192 + cin, stride 2
    def __init__(self, cin):
        super().__init__()
        self.b3 = nn.Sequential(Conv(cin, 192, 1), Conv(192, 320, 3, s=2))
        self.b7 = nn.Sequential(
            Conv(cin, 192, 1),
            Conv(192, 192, (1, 7), p=(0, 3)),
            Conv(192, 192, (7, 1), p=(3, 0)),
            Conv(192, 192, 3, s=2),
        )

    def forward(self, x):
        return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, 2)], 1)


class MixedE(nn.Module):  # InceptionE: 320 + 768 + 768 + 192; FID: avg pool (7b), max (7c)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.b1 = Conv(cin, 320, 1)
        self.b3, self.b3a, self.b3b = (
            Conv(cin, 384, 1),
            Conv(384, 384, (1, 3), p=(0, 1)),
            Conv(384, 384, (3, 1), p=(1, 0)),
        )
        self.bd = nn.Sequential(Conv(cin, 448, 1), Conv(448, 384, 3, p=1))
        self.bda, self.bdb = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
        self.bp = Conv(cin, 192, 1)

    def forward(self, x):
        h3, hd = self.b3(x), self.bd(x)
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _pool_avg(x)
        return torch.cat(
            [
                self.b1(x),
                self.b3a(h3),
                self.b3b(h3),
                self.bda(hd),
                self.bdb(hd),
                self.bp(pool),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 2048), called as net(x, return_features=True)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            Conv(3, 32, 3, s=2),
            Conv(32, 32, 3),
            Conv(32, 64, 3, p=1),
            nn.MaxPool2d(3, 2),
            Conv(64, 80, 1),
            Conv(80, 192, 3),
            nn.MaxPool2d(3, 2),
        )
        self.mixed = nn.Sequential(
            MixedA(192, 32),
            MixedA(256, 64),
            MixedA(288, 64),
            MixedB(288),
            MixedC(768, 128),
            MixedC(768, 160),
            MixedC(768, 160),
            MixedC(768, 192),
            MixedD(768),
            MixedE(1280, max_pool=False),
            MixedE(2048, max_pool=True),
        )

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = F.interpolate(x.to(torch.float32), size=(299, 299), mode="bilinear")
        x = self.mixed(self.stem((x - 128) / 128))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=16, help="input H = W (resized to 299 inside)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from fastdiff.metrics import extract_features

    dev = torch.device(args.device)
    net = torch.jit.script(FIDInceptionV3().eval().to(dev))
    from fastdiff.inception import FeatureNetwork

    network = FeatureNetwork(net, "benchmark", None)
    x = torch.randint(0, 256, (args.images, 1, args.size, args.size), dtype=torch.uint8)
    extract_features(x[: args.batch], network, batch_size=args.batch, device=dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    f = extract_features(x, network, batch_size=args.batch, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    assert f.shape == (args.images, 2048)
    print(
        f"{args.images} images ({args.size}x{args.size}, batch {args.batch}, {dev},"
        f" {torch.get_num_threads()} threads): {seconds:.2f} s ->"
        f" {seconds / args.images * 10000:.0f} s per 10k images"
    )


if __name__ == "__main__":
    main()
