"""fastdiff's hand-written Triton kernels (installed as ``fastdiff.kernels``).

One module per fused op, each with its launcher; ``reference`` holds the plain-torch
versions of the same formulas.  This package knows nothing of models, training or files.
Importing a kernel module imports Triton (set TRITON_INTERPRET=1 first to run the kernels on
CPU tensors); ``fastdiff.kernels.reference`` needs torch only.
"""
