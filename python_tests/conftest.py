"""Test setup: without CUDA, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before the package
is imported by any test module. torch.compile's on-disk caches are off: their keys do not cover the Python
autograd formulas registered for our operators, so a cached graph from an earlier version of this code
could pass a test that the current code fails.
"""
import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # read when torch is imported

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
