"""Small helpers shared by the tests (imported as ``from helpers import ...``)."""

import torch

#: Where the kernel tests run: compiled kernels on CUDA tensors when a GPU is present, else the
#: Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET then).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: Relative/absolute tolerance of a Triton result against the torch reference, per dtype.
#: fp32: both compute the same fp32 formula (FMA contraction may differ: ~1 ulp).  bf16/fp16:
#: both round the same fp32 value to the output dtype; a 1-ulp flip of the rounding is allowed.
TOLERANCE = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
}

#: Shapes with odd sizes and batches 1..9, small enough for the Triton interpreter.
SHAPES = [(1, 3, 17, 13), (2, 1, 5, 7), (5, 4, 3, 3), (9, 2, 6, 5)]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in memory layout "contiguous" or "channels_last" (same logical values)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def is_layout(x: torch.Tensor, layout: str) -> bool:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.is_contiguous(memory_format=fmt)
